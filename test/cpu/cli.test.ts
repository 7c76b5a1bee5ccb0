/** The command line, as a user runs it (the compiled dist/cli.js, which `npm install` builds). */
import { spawnSync } from "node:child_process";
import * as path from "node:path";

const root = path.join(__dirname, "..", "..");
const cli = path.join(root, "dist", "cli.js");
const fixture = path.join(root, "test", "fixtures", "lckv-w2");

function run(args: string[], input?: string) {
  const r = spawnSync(process.execPath, [cli, ...args], { cwd: root, encoding: "utf8", input, env: { ...process.env, LCKV_QUIET: "1" } });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

test("generate streams the prompt and its continuation from the default model", () => {
  const r = run(["generate", "Once upon a time", "--max-new-tokens", "12", "--seed", "1"]);
  expect(r.err).toBe("");
  expect(r.code).toBe(0);
  expect(r.out.startsWith("Once upon a time")).toBe(true);
  expect(r.out.length).toBeGreaterThan("Once upon a time".length + 5);
});

test("generate is reproducible with a seed and reads the prompt from stdin", () => {
  const a = run(["generate", "The sea", "-n", "10", "-s", "7", "-t", "0.9", "--model", fixture]);
  const b = run(["generate", "-n", "10", "-s", "7", "-t", "0.9", "--model", fixture], "The sea");
  expect(a.code).toBe(0);
  expect(b.out).toBe(a.out);
});

test("info reports the layer pattern and the KV saving", () => {
  const r = run(["info", "--model", fixture, "--json"]);
  expect(r.code).toBe(0);
  const info = JSON.parse(r.out);
  expect(info.layerTypes).toBe("0_4_4_4_4_5");
  expect(info.kvLayers).toEqual([0, 4, 5]);
  expect(info.kvReduction).toBeCloseTo(6 / 3);
  const text = run(["info", "--model", fixture]).out;
  expect(text).toMatch(/KV bytes\/token\s+.*standard cache: .*2\.00x less/);
});

test("bad arguments fail with a message that names them", () => {
  const neg = run(["generate", "x", "--max-new-tokens", "-1", "--model", fixture]);
  expect(neg.code).toBe(1);
  expect(neg.err).toMatch(/option 'maxNewTokens': must be a non-negative integer, got -1/);
  const frac = run(["generate", "x", "--max-new-tokens", "1.5"]);
  expect(frac.code).not.toBe(0);
  expect(frac.err).toMatch(/--max-new-tokens must be an integer/);
  const dev = run(["generate", "x", "--device", "tpu"]);
  expect(dev.err).toMatch(/--device.*tpu.*Allowed choices are auto, cpu, cuda/);
  for (const v of ["-3", "0"]) {
    const r = run(["eval-ppl", "--text", path.join(root, "README.md"), "--max-tokens", v]);
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/--max-tokens must be a positive integer/);
  }
  const missing = run(["info", "--model", "/nonexistent-model"]);
  expect(missing.code).toBe(1);
  expect(missing.err).toMatch(/lckv: model directory \/nonexistent-model does not exist/);
});

test("generate into a pipe that closes early (| head) stops quietly", () => {
  // A shell pipe into `head -c 20`: the CLI sees EPIPE on its next write.
  const r = spawnSync("bash", ["-c", `"${process.execPath}" "${cli}" generate "Once upon a time" -n 200 --temperature 0 --model "${fixture}" | head -c 20; exit \${PIPESTATUS[0]}`], {
    cwd: root,
    encoding: "utf8",
    env: { ...process.env, LCKV_QUIET: "1" },
  });
  expect(r.stdout).toHaveLength(20);
  expect(r.stderr).toBe("");
  expect(r.status).toBe(0);
});
