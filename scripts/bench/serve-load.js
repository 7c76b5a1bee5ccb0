#!/usr/bin/env node
/**
 * Load on `lckv serve` as clients see it: C concurrent streaming clients, each sending requests
 * one after another to /v1/completions, timed from the client side. For each concurrency it
 * reports requests/s, generated tokens/s, and the p50/p99 time to the first token and gap
 * between tokens (inter-token latency), over every request.
 *
 *   node scripts/bench/serve-load.js --model DIR [--concurrency 1,16,64] [--requests 4] [--max-tokens 64]
 *
 * It starts the server itself (dist/cli.js serve on a free loopback port) and stops it after.
 * Without a tokenizer in DIR, --tokenizer DIR copies one in (a random model has none).
 */
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");
const { Command } = require("commander");

const opt = new Command()
  .name("serve-load")
  .requiredOption("--model <dir>", "the model directory to serve")
  .option("--tokenizer <dir>", "copy tokenizer.json and tokenizer_config.json from here into --model first")
  .option("--device <d>", "the server's --device", "auto")
  .option("--concurrency <list>", "concurrent clients, comma-separated", "1,16,64")
  .option("--requests <n>", "requests per client", "4")
  .option("--max-tokens <n>", "max_tokens of each request (a request may end sooner, at an end-of-sequence token)", "64")
  .option("--prompt-words <n>", "words in each prompt", "100")
  .option("--json <file>", "write the figures as JSON here")
  .parse()
  .opts();

function quantile(xs, q) {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

function startServer() {
  const cli = path.join(__dirname, "..", "..", "dist", "cli.js");
  const child = spawn(process.execPath, [cli, "serve", "--model", opt.model, "--port", "0", "--device", opt.device], { stdio: ["ignore", "inherit", "pipe"] });
  return new Promise((resolve, reject) => {
    let err = "";
    child.stderr.on("data", (d) => {
      err += d;
      process.stderr.write(d);
      const m = err.match(/listening on (http:\/\/[^\s]+)/);
      if (m) resolve({ child, url: m[1].replace(/\/$/, "") });
    });
    child.on("exit", (code) => reject(new Error(`the server exited (${code}) before listening:\n${err}`)));
  });
}

// One streaming request; the times of each content chunk as it arrived.
async function request(url, prompt, maxTokens, seed) {
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: "lckv", prompt, max_tokens: maxTokens, temperature: 0, seed, stream: true }),
  });
  if (!res.ok) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  const arrivals = [];
  const decoder = new TextDecoder();
  let buf = "";
  for await (const part of res.body) {
    buf += decoder.decode(part, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.choices?.[0]?.text !== undefined) arrivals.push(performance.now() - t0);
    }
  }
  return arrivals;
}

(async () => {
  if (opt.tokenizer) for (const f of ["tokenizer.json", "tokenizer_config.json"]) fs.copyFileSync(path.join(opt.tokenizer, f), path.join(opt.model, f));
  const words = "the sea was calm and the ship sailed on through the night while the crew slept below".split(" ");
  const prompt = (k) => Array.from({ length: +opt.promptWords }, (_, i) => words[(i * 7 + k) % words.length]).join(" ");
  const { child, url } = await startServer();
  const rows = [];
  try {
    await request(url, prompt(0), 8, 0);  // warm-up: recordings, allocations
    for (const c of opt.concurrency.split(",").map(Number)) {
      const ttft = [], itl = [];
      let tokens = 0;
      const t0 = performance.now();
      await Promise.all(Array.from({ length: c }, async (_, client) => {
        for (let r = 0; r < +opt.requests; r++) {
          const a = await request(url, prompt(client * 31 + r), +opt.maxTokens, client);
          if (a.length) ttft.push(a[0]);
          for (let j = 1; j < a.length; j++) itl.push(a[j] - a[j - 1]);
          tokens += a.length;
        }
      }));
      const s = (performance.now() - t0) / 1000;
      const row = {
        concurrency: c,
        requests: c * +opt.requests,
        requestsPerSecond: (c * +opt.requests) / s,
        tokensPerSecond: tokens / s,
        ttftP50Ms: quantile(ttft, 0.5),
        ttftP99Ms: quantile(ttft, 0.99),
        itlP50Ms: quantile(itl, 0.5),
        itlP99Ms: quantile(itl, 0.99),
      };
      rows.push(row);
      console.log(
        `clients ${String(c).padStart(3)}: ${row.requestsPerSecond.toFixed(2)} req/s, ${row.tokensPerSecond.toFixed(0)} tok/s, ` +
          `TTFT p50 ${row.ttftP50Ms.toFixed(1)} / p99 ${row.ttftP99Ms.toFixed(1)} ms, ITL p50 ${row.itlP50Ms.toFixed(2)} / p99 ${row.itlP99Ms.toFixed(2)} ms`,
      );
    }
  } finally {
    child.kill("SIGTERM");
  }
  if (opt.json) fs.writeFileSync(opt.json, JSON.stringify({ model: opt.model, maxTokens: +opt.maxTokens, rows }, null, 2));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
