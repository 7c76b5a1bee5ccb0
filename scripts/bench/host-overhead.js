#!/usr/bin/env node
/**
 * The host's share of a decode step: a one-layer toy model (hidden 64, vocab 256) whose
 * arithmetic is negligible, decoded token by token three ways: the native call alone
 * (decodeBatch: the hand-off to a worker thread and back), through the scheduler, and through
 * generate(). What it prints is the per-step cost of the machinery around the model.
 *
 *   node scripts/bench/host-overhead.js [--device cpu|cuda] [--steps 100] [--rounds 40]
 */
const { execFileSync } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { Command } = require("commander");
const { loadModel } = require("../../dist");

const opt = new Command()
  .name("host-overhead")
  .option("--device <d>", "cpu or cuda", "cpu")
  .option("--steps <n>", "decode steps per sequence (short, so the context stays small)", "100")
  .option("--rounds <n>", "sequences, one after another", "40")
  .parse()
  .opts();

const dir = path.join(os.tmpdir(), "lckv-bench", "host-overhead-toy");
if (!fs.existsSync(path.join(dir, "config.json"))) {
  const args = ["--out", dir, "--layers", "1", "--hidden", "64", "--heads", "2", "--kv-heads", "1", "--intermediate", "128", "--vocab", "256", "--max-positions", "4096"];
  execFileSync(process.execPath, [path.join(__dirname, "make-random-model.js"), ...args], { stdio: "ignore" });
}

(async () => {
  const model = await loadModel(dir, { device: opt.device, threads: 1, prefixCache: 0 });
  const native = model.nativeModel();
  const sampling = { temperature: 0 };
  const steps = +opt.steps, rounds = +opt.rounds;
  const perStep = async (run) => {
    let ns = 0;
    for (let round = 0; round < rounds; round++) {
      const seq = model.createSequence();
      await seq.append([1, 2, 3, 4]);
      const t0 = process.hrtime.bigint();
      await run(seq);
      ns += Number(process.hrtime.bigint() - t0);
      seq.dispose();
    }
    return ns / rounds / steps / 1e3;
  };
  const loop = (step) => async (seq) => {
    let tok = 5;
    for (let i = 0; i < steps; i++) tok = await step(seq.native, tok);
  };
  const raw = await perStep(loop(async (s, tok) => (await native.decodeBatch([s], Int32Array.of(tok), [sampling]))[0]));
  const scheduled = await perStep(loop((s, tok) => model.scheduler.decode(s, tok, sampling)));
  const generated = await perStep(async (seq) => {
    for await (const x of seq.generate({ maxNewTokens: steps, temperature: 0, ignoreEos: true })) void x;
  });
  console.log(`${opt.device}: native decodeBatch ${raw.toFixed(1)} us/step, through the scheduler ${scheduled.toFixed(1)}, through generate() ${generated.toFixed(1)}`);
  await model.dispose();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
