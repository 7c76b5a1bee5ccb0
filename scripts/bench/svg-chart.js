/**
 * A small SVG line chart, log-scaled axes where asked: enough for the bench report's figures, no
 * dependency.
 */
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

function lineChart({ title, xLabel, yLabel, series, logX = false, logY = false }) {
  const W = 640, H = 400, m = { l: 70, r: 170, t: 40, b: 50 };
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}"><text x="20" y="30">${title}: no data</text></svg>\n`;
  const tx = (v) => (logX ? Math.log10(v) : v), ty = (v) => (logY ? Math.log10(v) : v);
  const xs = pts.map((p) => tx(p[0])), ys = pts.map((p) => ty(p[1]));
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), logY ? Math.min(...ys) : 0, Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  const X = (v) => m.l + ((tx(v) - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (v) => H - m.b - ((ty(v) - y0) / (y1 - y0)) * (H - m.t - m.b);
  const ticks = (a, b, log) => {
    if (log) {
      const out = [];
      for (let e = Math.floor(a); e <= Math.ceil(b); e++) out.push(10 ** e);
      return out.filter((v) => Math.log10(v) >= a - 1e-9 && Math.log10(v) <= b + 1e-9);
    }
    const step = 10 ** Math.floor(Math.log10((b - a) / 4 || 1));
    const out = [];
    for (let v = Math.ceil(a / step) * step; v <= b + 1e-9; v += step * Math.ceil((b - a) / step / 5)) out.push(v);
    return out;
  };
  const label = (v) => (v >= 1e9 ? `${v / 1e9}G` : v >= 1e6 ? `${v / 1e6}M` : v >= 1e3 ? `${v / 1e3}k` : `${+v.toPrecision(3)}`);
  let s = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">\n`;
  s += `<rect width="${W}" height="${H}" fill="white"/>\n<text x="${m.l}" y="22" font-size="15">${title}</text>\n`;
  s += `<line x1="${m.l}" y1="${H - m.b}" x2="${W - m.r}" y2="${H - m.b}" stroke="black"/><line x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${H - m.b}" stroke="black"/>\n`;
  for (const v of ticks(x0, x1, logX)) s += `<text x="${X(logX ? v : v).toFixed(1)}" y="${H - m.b + 16}" text-anchor="middle">${label(v)}</text>\n`;
  for (const v of ticks(y0, y1, logY)) s += `<text x="${m.l - 6}" y="${Y(v).toFixed(1)}" text-anchor="end" dominant-baseline="middle">${label(v)}</text><line x1="${m.l}" x2="${W - m.r}" y1="${Y(v).toFixed(1)}" y2="${Y(v).toFixed(1)}" stroke="#ddd"/>\n`;
  s += `<text x="${(m.l + W - m.r) / 2}" y="${H - 12}" text-anchor="middle">${xLabel}</text>\n`;
  s += `<text transform="translate(16 ${(m.t + H - m.b) / 2}) rotate(-90)" text-anchor="middle">${yLabel}</text>\n`;
  series.forEach((ser, i) => {
    const c = COLORS[i % COLORS.length];
    const p = [...ser.points].sort((a, b) => a[0] - b[0]);
    s += `<polyline fill="none" stroke="${c}" stroke-width="2" points="${p.map((q) => `${X(q[0]).toFixed(1)},${Y(q[1]).toFixed(1)}`).join(" ")}"/>\n`;
    for (const q of p) s += `<circle cx="${X(q[0]).toFixed(1)}" cy="${Y(q[1]).toFixed(1)}" r="3" fill="${c}"/>\n`;
    s += `<rect x="${W - m.r + 12}" y="${m.t + i * 18}" width="12" height="3" fill="${c}"/><text x="${W - m.r + 30}" y="${m.t + i * 18 + 5}">${ser.name}</text>\n`;
  });
  return s + "</svg>\n";
}

module.exports = { lineChart };
