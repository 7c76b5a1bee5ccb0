/**
 * Experiment 4: the Python peers on the same card in the same run, at the 1.1B shape:
 * transformers' eager and static-cache generate() (hf_peer.py) on the standard model, and the
 * project's PyTorch reference for LCKV (reference_peer.py). Each peer row carries lckv's own
 * decode step at the same point, measured right after it.
 */
const { execFileSync } = require("node:child_process");
const path = require("node:path");
const { forkedDecodeMs, randomPrefixes } = require("../measure");

const SHAPE = "1.1b";

/** Runs a Python script of scripts/bench and returns the JSON lines it printed. */
function python(script, args) {
  const out = execFileSync("python3", [path.join(__dirname, "..", script), ...args], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  return out.trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
}

async function experimentHfPeers(bench) {
  if (!bench.peers || bench.device !== "cuda" || !bench.shapes.includes(SHAPE)) return [];
  await bench.store.ensure(SHAPE, ["standard", "lckv-w2"]);
  const rows = [];
  const std = bench.store.dir(SHAPE, "standard");
  const tokens = bench.tiny ? "4" : "32";
  const context = bench.tiny ? 128 : 2048;
  const ours = async (model, batch, ctx) => {
    const [base] = await randomPrefixes(model, 1, ctx + 1);
    const t = await forkedDecodeMs([base], batch, bench.tiny ? 4 : 16, bench.repeats);
    base.dispose();
    return t;
  };
  const peer = (script, args, what) => {
    try {
      return python(script, args);
    } catch (e) {
      return [{ peer: what, error: `${script} exited with status ${e.status} (its output is in the bench log)` }];
    }
  };
  const model = await bench.load(SHAPE, "standard");
  // Batch 1 at 128 and 2048 tokens, eager and with the static cache (one process, one load;
  // the static cache makes transformers compile its forward, once per cache length, and the
  // bench log shows how long each warm-up with its compile took).
  for (const r of peer("hf_peer.py", ["--model", std, "--context", `128,${context}`, "--tokens", tokens, "--batch", "1", "--repeats", String(bench.repeats), "--caches", "dynamic,static"], "transformers")) {
    if (!r.error) r.ours = await ours(model, 1, r.context);
    rows.push({ shape: SHAPE, ...r });
  }
  // A large batch at 512 tokens of context: 64 sequences (a serving-sized batch that
  // transformers' eager cache holds easily), or the largest batch our standard model ran at
  // 512+1024 (experiment 1) if that is larger.
  const fits = (bench.results.throughput ?? []).find((r) => r.shape === SHAPE && r.model === "standard" && r.prompt === 512 && r.batch)?.batch ?? 0;
  const big = bench.tiny ? 16 : Math.max(64, fits);
  for (const r of peer("hf_peer.py", ["--model", std, "--context", "512", "--tokens", tokens, "--batch", String(big), "--repeats", String(bench.repeats)], "transformers eager")) {
    if (!r.error) r.ours = await ours(model, big, r.context);
    rows.push({ shape: SHAPE, ...r });
  }
  await model.dispose();
  const lckv = await bench.load(SHAPE, "lckv-w2");
  for (const r of peer("reference_peer.py", ["--model", bench.store.dir(SHAPE, "lckv-w2"), "--context", "128", "--tokens", bench.tiny ? "4" : "16", "--repeats", String(bench.repeats)], "lckv PyTorch reference")) {
    if (!r.error) r.ours = await ours(lckv, 1, 128);
    rows.push({ shape: SHAPE, ...r });
  }
  await lckv.dispose();
  return rows;
}

module.exports = { experimentHfPeers, python };
