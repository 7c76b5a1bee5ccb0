/** The command line, as a user runs it (the compiled dist/cli.js, which `npm install` builds). */
import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { loadModel } from "../../lib";
import { testTempDir } from "../helpers/temp-dir";

const root = path.join(__dirname, "..", "..");
const cli = path.join(root, "dist", "cli.js");
const fixture = path.join(root, "test", "fixtures", "lckv-w2");

function run(args: string[], input?: string, quiet = true) {
  const env = { ...process.env };
  if (quiet) env.LCKV_QUIET = "1";
  else delete env.LCKV_QUIET;
  const r = spawnSync(process.execPath, [cli, ...args], { cwd: root, encoding: "utf8", input, env });
  return { code: r.status, out: r.stdout, err: r.stderr };
}
const STATS = /^lckv: (\d+) tokens in \d+\.\d\d s(, [\d.]+ tokens\/s)?(, first token after \d+ ms)?(; stopped at the context \(\d+ tokens\))?$/m;

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
  // What `echo` pipes in ends with a newline, which is not part of the prompt; a second one is.
  const c = run(["generate", "-n", "10", "-s", "7", "-t", "0.9", "--model", fixture], "The sea\n");
  expect(c.out).toBe(a.out);
  const d = run(["generate", "-n", "10", "-s", "7", "-t", "0.9", "--model", fixture], "The sea\n\n");
  expect(d.out.startsWith("The sea\n")).toBe(true);
});

test("info reports the layer pattern and the KV saving", () => {
  const r = run(["info", "--model", fixture, "--json"]);
  expect(r.code).toBe(0);
  const info = JSON.parse(r.out);
  expect(info.layerTypes).toBe("0_4_4_4_4_5");
  expect(info.kvLayers).toEqual([0, 4, 5]);
  expect(info.kvReduction).toBeCloseTo(6 / 3);
  const text = run(["info", "--model", fixture]).out;
  expect(text).toMatch(/KV bytes\/token\s+.* in bf16 \(standard cache: .*2\.00x less/);
  // Each layer's mask and window: lckv-w2's cyclic layers see only earlier tokens; lckv-sliding
  // windows three of its layers.
  expect(info.diagonalMasked).toEqual([1, 2, 3]);
  expect(info.slidingWindow).toEqual([0, 0, 0, 0, 0, 0]);
  expect(text).toMatch(/^diagonal masked\s+layers 1, 2, 3$/m);
  expect(text).toMatch(/^sliding window\s+none$/m);
  const sliding = run(["info", "--model", path.join(root, "test", "fixtures", "lckv-sliding")]).out;
  expect(sliding).toMatch(/^sliding window\s+4 tokens on layers 0, 1, 5; none on layers 2, 3, 4$/m);
  // A standard model is its own standard cache: said so, not "1.00x less".
  const standard = run(["info", "--model", path.join(root, "test", "fixtures", "llama-mha-hd16")]).out;
  expect(standard).toMatch(/KV bytes\/token\s+.* in bf16 \(a standard cache: every layer's K\/V\)$/m);
  // Every type's cost per token: 3 KV layers x 2 K/V heads x 16 dims x (K and V).
  expect(info.kvCacheDtype).toBe("bf16");
  expect(info.kvBytesPerTokenByDtype).toEqual({ f32: 3 * 2 * 16 * 2 * 4, bf16: 3 * 2 * 16 * 2 * 2, fp8: 3 * (2 * 16 * 2 + 2 * 4), int8: 3 * (2 * 16 * 2 + 2 * 4), int4: 3 * (2 * 16 + 2 * 4) });
  expect(text).toMatch(/by K\/V type\s+f32 .*, bf16 .*, fp8 .*, int8 .*, int4 /);
  const f32 = JSON.parse(run(["info", "--model", fixture, "--json", "--kv-dtype", "f32"]).out);
  expect(f32.kvCacheDtype).toBe("f32");
  expect(f32.kvBytesPerToken).toBe(3 * 2 * 16 * 2 * 4);
  const bad = run(["info", "--model", fixture, "--kv-dtype", "int3"]);
  expect(bad.code).not.toBe(0);
  expect(bad.err).toMatch(/--kv-dtype.*int3.*Allowed choices are f32, bf16, fp8, int8, int4/);
});

test("--dtype chooses the weights' type: bf16 rounds an f32 checkpoint's weights, f32 keeps them as the default does on the CPU", () => {
  const ppl = (extra: string[]) => {
    const r = run(["eval-ppl", "--model", fixture, "--text", path.join(root, "README.md"), "--max-tokens", "200", "--device", "cpu", "--json", ...extra]);
    expect(r.code).toBe(0);
    // The figure's conditions travel with it.
    const j = JSON.parse(r.out);
    expect(j).toMatchObject({ device: "cpu", dtype: extra[1] ?? "auto", kvCacheDtype: "bf16" });
    return j.perplexity as number;
  };
  const checkpoint = ppl([]);
  expect(ppl(["--dtype", "f32"])).toBe(checkpoint);
  const bf16 = ppl(["--dtype", "bf16"]);
  expect(bf16).not.toBe(checkpoint);
  expect(Math.abs(bf16 / checkpoint - 1)).toBeLessThan(0.05);
  const bad = run(["eval-ppl", "--model", fixture, "--text", path.join(root, "README.md"), "--dtype", "f64"]);
  expect(bad.code).not.toBe(0);
  expect(bad.err).toMatch(/--dtype.*f64.*Allowed choices are auto, f32, f16, bf16/);
});

test("condense refuses a calibration file it cannot read, an unsupported model and a missing --out by name", () => {
  const out = path.join(testTempDir("lckv-cli-condense-"), "m");
  const missing = run(["condense", fixture, "--out", out, "--calib", "/nonexistent-calibration.txt", "--kv-layers", "2"]);
  expect(missing.code).not.toBe(0);
  expect(missing.err).toMatch(/--calib \/nonexistent-calibration\.txt/);
  const qwen = testTempDir("lckv-cli-qwen-");
  const cfg = JSON.parse(fs.readFileSync(path.join(root, "test", "fixtures", "llama-gqa-hd32", "config.json"), "utf8"));
  fs.writeFileSync(path.join(qwen, "config.json"), JSON.stringify({ ...cfg, architectures: ["Qwen2ForCausalLM"], model_type: "qwen2" }));
  const unsupported = run(["condense", qwen, "--out", out, "--calib", path.join(root, "README.md"), "--kv-layers", "1"]);
  expect(unsupported.code).not.toBe(0);
  expect(unsupported.err).toMatch(/architecture 'Qwen2ForCausalLM' is not supported/);
  // Neither of --kv-layers and --ratio, or both: said in the command line's words.
  for (const extra of [[], ["--kv-layers", "2", "--ratio", "0.5"]]) {
    const r = run(["condense", fixture, "--out", out, "--calib", path.join(root, "README.md"), ...extra]);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/^lckv: option '--kv-layers': give exactly one of --kv-layers and --ratio$/m);
  }
  const noOut = run(["condense", fixture, "--calib", path.join(root, "README.md")]);
  expect(noOut.err).toMatch(/--out <dir>/);
  expect(fs.existsSync(out)).toBe(false);
});

test("bad arguments fail with a message that names them", () => {
  const neg = run(["generate", "x", "--max-new-tokens", "-1", "--model", fixture]);
  expect(neg.code).toBe(1);
  expect(neg.err).toMatch(/option '--max-new-tokens': must be a non-negative integer, got -1/);
  const frac = run(["generate", "x", "--max-new-tokens", "1.5"]);
  expect(frac.code).not.toBe(0);
  expect(frac.err).toMatch(/--max-new-tokens must be an integer/);
  const dev = run(["generate", "x", "--device", "tpu"]);
  expect(dev.err).toMatch(/--device.*tpu.*Allowed choices are auto, cpu, cuda/);
  for (const v of ["-3", "0"]) {
    const r = run(["eval-ppl", "--text", path.join(root, "README.md"), "--max-tokens", v]);
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/--max-tokens must be an integer >= 2/);
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

test("generate with stderr in a pipe that closes early (2>&1 | head) stops quietly too", () => {
  // Without -q the stats line goes to stderr after the text: its write meets the closed pipe.
  const r = spawnSync("bash", ["-c", `"${process.execPath}" "${cli}" generate "Once upon a time" -n 200 --temperature 0 --model "${fixture}" 2>&1 | head -c 20; exit \${PIPESTATUS[0]}`], {
    cwd: root,
    encoding: "utf8",
    env: { ...process.env, LCKV_QUIET: "1" },
  });
  expect(r.stdout).toHaveLength(20);
  expect(r.status).toBe(0);
});

test("eval-ppl --max-tokens below 2 and an empty --model are refused by name, before any output", () => {
  const one = run(["eval-ppl", "--model", fixture, "--text", path.join(root, "README.md"), "--max-tokens", "1"]);
  expect(one.code).toBe(1);
  expect(one.err).toMatch(/option '--max-tokens <n>' argument '1' is invalid\. --max-tokens must be an integer >= 2/);
  const empty = run(["info", "--model", ""]);
  expect(empty.code).toBe(1);
  expect(empty.err).toMatch(/--model must not be empty/);
  expect(empty.err).not.toMatch(/running on the CPU|config\.json/);
});

test("condense interrupted (SIGINT) exits 130 and leaves no partial directory behind", async () => {
  const parent = testTempDir("lckv-cli-condense-int-");
  const out = path.join(parent, "m");
  const calib = path.join(parent, "calib.txt");
  fs.writeFileSync(calib, fs.readFileSync(path.join(root, "README.md"), "utf8").repeat(60));
  // GPT-2's fixture with enough calibration text that its check (the held-back tenth, scored after
  // the partial directory is written) takes seconds.
  const gpt2 = path.join(root, "test", "fixtures", "gpt2");
  const args = [cli, "condense", gpt2, "--out", out, "--calib", calib, "--ratio", "0.5", "--calib-tokens", "30000"];
  const child = spawn(process.execPath, args, { cwd: root, env: { ...process.env, LCKV_QUIET: "1" }, stdio: "ignore" });
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  // Interrupted once its partial directory exists (the run has begun writing).
  const partial = () => fs.readdirSync(parent).some((f) => f.startsWith("m.partial-"));
  for (let i = 0; i < 6000 && !partial() && child.exitCode === null; i++) await new Promise((r) => setTimeout(r, 5));
  expect(partial()).toBe(true);
  child.kill("SIGINT");
  expect(await exited).toBe(130);
  expect(fs.readdirSync(parent).sort()).toEqual(["calib.txt"]);
});

test("chat on a terminal: Ctrl-C at the prompt ends the chat with 130 (readline gets it as a key, not a signal)", async () => {
  const chatModel = path.join(root, "test", "fixtures", "llama-mha-hd16");
  const cmd = [process.execPath, cli, "chat", "-n", "3", "--model", chatModel].map((a) => `'${a}'`).join(" ");
  const child = spawn("script", ["-qec", cmd, "/dev/null"], { cwd: root, env: { ...process.env, LCKV_QUIET: "1" } });
  let out = "";
  const prompted = new Promise<void>((resolve) => child.stdout.on("data", (d: Buffer) => (out += d.toString("utf8")).includes("> ") && resolve()));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  await prompted;  // readline holds the terminal in raw mode from here
  child.stdin.write("\x03");
  expect(await exited).toBe(130);
});

test("--version prints the package's version", () => {
  const r = run(["--version"]);
  expect(r.code).toBe(0);
  expect(r.out.trim()).toBe(JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8")).version);
});

test("an option error comes before any output, the prompt included", () => {
  const r = run(["generate", "Hi", "-t", "-1", "--model", fixture]);
  expect(r.code).toBe(1);
  expect(r.out).toBe("");
  expect(r.err).toMatch(/option '--temperature': must be >= 0, got -1/);
  const p = run(["generate", "Hi", "--top-p", "2", "--model", fixture]);
  expect(p.code).toBe(1);
  expect(p.out).toBe("");
  expect(p.err).toMatch(/option '--top-p': must be/);
});

test("a prompt the model cannot take fails before any output: the prompt is not echoed", () => {
  const prompt = "one two three four five six seven eight nine ten eleven twelve";
  const r = run(["generate", prompt, "--max-context", "8", "-n", "2", "--model", fixture]);
  expect(r.code).toBe(1);
  expect(r.out).toBe("");
  expect(r.err).toMatch(/prompt has \d+ tokens but the context holds 8/);
  // The same prompt within the context is still echoed before its continuation, and with -n 0 alone.
  const ok = run(["generate", prompt, "--max-context", "64", "-n", "2", "-t", "0", "--model", fixture]);
  expect(ok.code).toBe(0);
  expect(ok.out.startsWith(prompt)).toBe(true);
  expect(ok.out.length).toBeGreaterThan(prompt.length + 1);
  const none = run(["generate", prompt, "-n", "0", "--model", fixture]);
  expect(none.code).toBe(0);
  expect(none.out).toBe(prompt + "\n");
});

test("generate ends with a stats line on stderr, and --quiet leaves it out", () => {
  const ok = run(["generate", "The sea", "-n", "6", "-t", "0", "--model", fixture, "--device", "cpu"], undefined, false);
  expect(ok.code).toBe(0);
  const m = ok.err.match(STATS);
  expect(m).not.toBeNull();
  expect(Number(m![1])).toBeGreaterThan(0);
  expect(Number(m![1])).toBeLessThanOrEqual(6);
  const quiet = run(["generate", "The sea", "-n", "6", "-t", "0", "--model", fixture, "--device", "cpu", "--quiet"], undefined, false);
  expect(quiet.code).toBe(0);
  expect(quiet.err).not.toMatch(STATS);
  expect(quiet.out).toBe(ok.out);
  // A reply cut by the context, not by -n, says so.
  const cut = run(["generate", "The sea", "-n", "1000", "--max-context", "32", "-t", "0", "--model", fixture, "--device", "cpu"], undefined, false);
  expect(cut.code).toBe(0);
  expect(cut.err).toMatch(/^lckv: \d+ tokens in .*; stopped at the context \(32 tokens\)$/m);
  expect(ok.err).not.toMatch(/stopped at the context/);
});

test("eval-ppl --prefill-tolerance reaches the fixed point's test: a looser one stops sooner; out of range is refused by name", () => {
  const fixedPoint = (extra: string[]) => {
    const r = run(["eval-ppl", "--text", path.join(root, "README.md"), "--max-tokens", "300", "--window", "100", "--device", "cpu", "--prefill", "fixed-point", "--json", ...extra]);
    expect(r.code).toBe(0);
    return JSON.parse(r.out);
  };
  const tight = fixedPoint([]);
  const loose = fixedPoint(["--prefill-tolerance", "0.5"]);
  expect(tight.prefillTolerance).toBeUndefined();
  expect(loose.prefillTolerance).toBe(0.5);
  expect(loose.passesMedian).toBeLessThan(tight.passesMedian);
  for (const v of ["1", "-0.1", "x"]) {
    const bad = run(["eval-ppl", "--text", path.join(root, "README.md"), "--prefill-tolerance", v]);
    expect(bad.code).not.toBe(0);
    expect(bad.err).toMatch(/--prefill-tolerance must be a number/);
  }
  // A flag of another mode than the prefill's is refused, not ignored.
  const readme = path.join(root, "README.md");
  const passes = run(["eval-ppl", "--text", readme, "--max-tokens", "50", "--device", "cpu", "--prefill", "sequential", "--prefill-passes", "3"]);
  expect(passes.code).toBe(1);
  expect(passes.err).toMatch(/option '--prefill-passes': applies to prefill "iterative" only, and the prefill is sequential/);
  const tolerance = run(["eval-ppl", "--text", readme, "--max-tokens", "50", "--device", "cpu", "--prefill", "iterative", "--prefill-tolerance", "0.1"]);
  expect(tolerance.code).toBe(1);
  expect(tolerance.err).toMatch(/option '--prefill-tolerance': applies to prefill "fixed-point" only/);
  // generate takes the same flags, under the same rule: iterative with 1 pass continues otherwise
  // than with the model's own passes (greedy, the default model's lckv-w2 twin fixture).
  const gen = (extra: string[]) => run(["generate", "Once upon a time there was a little", "-n", "6", "-t", "0", "--model", fixture, "--device", "cpu", "--prefill", "iterative", ...extra]);
  const one = gen(["--prefill-passes", "1"]);
  const own = gen([]);
  expect(one.code).toBe(0);
  expect(own.code).toBe(0);
  expect(gen(["--prefill-passes", "1"]).out).toBe(one.out);
  expect(one.out).not.toBe(own.out);
  const wrong = run(["generate", "x", "-n", "1", "--model", fixture, "--device", "cpu", "--prefill", "sequential", "--prefill-passes", "2"]);
  expect(wrong.code).toBe(1);
  expect(wrong.err).toMatch(/option '--prefill-passes': applies to prefill "iterative" only, and the prefill is sequential/);
});

test("eval-ppl on an empty file or one that is not UTF-8 is a typed error with a non-zero exit; whitespace is text, scored", () => {
  const dir = testTempDir("lckv-cli-");
  try {
    const f = path.join(dir, "empty.txt");
    fs.writeFileSync(f, "");
    const empty = run(["eval-ppl", "--text", f, "--model", fixture]);
    expect(empty.code).toBe(1);
    expect(empty.out).toBe("");
    expect(empty.err).toMatch(/--text .*empty\.txt is empty: perplexity needs at least two tokens/);
    // Bytes that are no UTF-8 (a binary file) are refused, not scored as U+FFFD.
    const bin = path.join(dir, "data.bin");
    fs.writeFileSync(bin, Buffer.from([0x4f, 0x6e, 0xff, 0xfe, 0x80, 0x20, 0x61]));
    const binary = run(["eval-ppl", "--text", bin, "--model", fixture]);
    expect(binary.code).toBe(1);
    expect(binary.err).toMatch(/^lckv: --text .*data\.bin is not UTF-8 text$/m);
    const calib = run(["condense", fixture, "--out", path.join(dir, "out"), "--calib", bin, "--kv-layers", "2"]);
    expect(calib.code).toBe(1);
    expect(calib.err).toMatch(/^lckv: --calib .*data\.bin is not UTF-8 text$/m);
    // Text of whitespace alone is text: its tokens are scored like any others.
    const ws = path.join(dir, "ws.txt");
    fs.writeFileSync(ws, "  \n\n   \n \t\n  \n");
    const white = run(["eval-ppl", "--text", ws, "--model", fixture, "--json"]);
    expect(white.code).toBe(0);
    expect(JSON.parse(white.out).predictedTokens).toBeGreaterThan(0);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("generate on a terminal or an empty pipe without a prompt says so instead of continuing from nothing", () => {
  // A pseudo-terminal for stdin (util-linux script): the check is on process.stdin.isTTY.
  const cmd = [process.execPath, cli, "generate", "-n", "3", "--model", fixture].map((a) => `'${a}'`).join(" ");
  const r = spawnSync("script", ["-qec", cmd, "/dev/null"], { cwd: root, encoding: "utf8", env: { ...process.env, LCKV_QUIET: "1" }, input: "" });
  expect(r.error).toBeUndefined();
  expect(r.stdout).toMatch(/^lckv: no prompt: give it as the argument or on stdin\r?$/m);
  expect(r.status).toBe(1);
  // An empty pipe is a forgotten prompt too; "" asks for text from nothing on purpose.
  for (const input of ["", "\n"]) {
    const empty = run(["generate", "-n", "3", "--model", fixture], input);
    expect(empty.code).toBe(1);
    expect(empty.err).toMatch(/^lckv: no prompt: stdin was empty \(give "" as the argument to continue from nothing\)$/m);
  }
});

test("chat answers each line through the chat template, one stats line a turn", () => {
  const chatModel = path.join(root, "test", "fixtures", "llama-mha-hd16");
  const r = run(["chat", "--model", chatModel, "-n", "4", "-t", "0", "--device", "cpu"], "hello there\nhow are you\n", false);
  expect(r.code).toBe(0);
  const turns = r.err.split("\n").filter((l) => STATS.test(l));
  expect(turns).toHaveLength(2);
  // The same conversation gives the same replies (greedy), and a line that ends it early stops there.
  const again = run(["chat", "--model", chatModel, "-n", "4", "-t", "0", "--device", "cpu"], "hello there\nhow are you\n");
  expect(again.out).toBe(r.out);
  const one = run(["chat", "--model", chatModel, "-n", "4", "-t", "0", "--device", "cpu"], "hello there\n\nhow are you\n", false);
  expect(one.err.split("\n").filter((l) => STATS.test(l))).toHaveLength(1);
  // A turn the context (128 positions) cannot hold is refused and the chat goes on, as it was.
  const long = "hello ".repeat(200);
  const over = run(["chat", "--model", chatModel, "-n", "4", "-t", "0", "--device", "cpu"], `hello there\n${long}\nhow are you\n`, false);
  expect(over.code).toBe(0);
  expect(over.err).toMatch(/context holds 128; that message was not sent/);
  expect(over.err.split("\n").filter((l) => STATS.test(l))).toHaveLength(2);
  expect(over.out).toBe(r.out);
  // /reset starts the conversation again: the same first reply as at the start.
  const reset = run(["chat", "--model", chatModel, "-n", "4", "-t", "0", "--device", "cpu"], `hello there\n/reset\nhello there\n`, false);
  expect(reset.code).toBe(0);
  expect(reset.err).toMatch(/lckv: the conversation is cleared/);
  const replies = reset.out.split("\n").filter((l) => l !== "");
  expect(replies).toHaveLength(2);
  expect(replies[1]).toBe(replies[0]);
  expect(over.err).toMatch(/that message was not sent \(\/reset clears the conversation; Ctrl-C stops a reply; an empty line, Ctrl-D or Ctrl-C at the prompt ends the chat\)/);
  // A model without a chat template fails before reading anything.
  const none = run(["chat", "--model", fixture], "hi\n");
  expect(none.code).toBe(1);
  expect(none.err).toMatch(/no chat_template/);
});

test("serve refuses an empty --api-key, one no header can carry, or an origin that is not one, in one line before it loads the model", () => {
  for (const key of ["", "  ", " key"]) {
    const r = run(["serve", "--api-key", key, "--model", "/no/such/model"]);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/^lckv: option '--api-key': must (be a non-empty string|not begin or end with whitespace)/);
    expect(r.err.trim().split("\n")).toHaveLength(1);
  }
  // An origin with a path (a page's address, not its origin) would match no browser's request.
  const origins = run(["serve", "--allowed-origins", "https://app.example,https://b.example/app", "--model", "/no/such/model"]);
  expect(origins.code).toBe(1);
  expect(origins.err).toMatch(/^lckv: option '--allowed-origins': must be a list of origins .*"https:\/\/b\.example\/app" is not one \(its origin is "https:\/\/b\.example"\)$/m);
  // Every request's prefill: a flag of another mode than --prefill's is refused by name, before the model loads.
  const passes = run(["serve", "--prefill", "sequential", "--prefill-passes", "2", "--model", "/no/such/model"]);
  expect(passes.code).toBe(1);
  expect(passes.err).toMatch(/^lckv: option '--prefill-passes': applies to prefill "iterative" only, and the prefill is sequential$/m);
  const mode = run(["serve", "--prefill", "fast", "--model", "/no/such/model"]);
  expect(mode.code).not.toBe(0);
  expect(mode.err).toMatch(/option '--prefill <mode>' argument 'fast' is invalid/);
});

test("chat takes --prefill and its passes, and refuses a flag of another mode before it loads the model", async () => {
  const chatModel = path.join(root, "test", "fixtures", "llama-mha-hd16");
  // An LCKV model with a chat template: its reply depends on how the conversation is prefilled.
  const lckvChat = testTempDir("lckv-cli-chat-");
  for (const f of fs.readdirSync(fixture)) fs.copyFileSync(path.join(fixture, f), path.join(lckvChat, f));
  fs.writeFileSync(path.join(lckvChat, "chat_template.jinja"), "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>");
  const line = "hello there, how are you doing today my friend";
  const reply = (extra: string[]) => run(["chat", "--model", lckvChat, "-n", "8", "-t", "0", "--device", "cpu", ...extra], `${line}\n`);
  const plain = reply([]);
  const onePass = reply(["--prefill", "iterative", "--prefill-passes", "1"]);
  expect(onePass.code).toBe(0);
  expect(onePass.out).not.toBe(plain.out);
  // What the library's chat session gives with the same options, and by default.
  const model = await loadModel(lckvChat, { device: "cpu" });
  try {
    const send = async (options: object) => {
      using session = model.createChatSession();
      return (await session.send(line, { maxNewTokens: 8, temperature: 0, ...options }).result).text;
    };
    expect(onePass.out).toBe(`${await send({ prefill: "iterative", prefillPasses: 1 })}\n`);
    expect(plain.out).toBe(`${await send({})}\n`);
  } finally {
    await model.dispose();
  }
  const wrong = run(["chat", "--model", "/no/such/model", "--prefill", "iterative", "--prefill-tolerance", "0.1"], "hi\n");
  expect(wrong.code).toBe(1);
  expect(wrong.err).toMatch(/^lckv: option '--prefill-tolerance': applies to prefill "fixed-point" only, and the prefill is iterative$/m);
  // Without --prefill, the model's default mode decides (sequential on the CPU): refused once it
  // is loaded, before any line is read.
  // (An empty stdin: no line is ever sent, so only that check can refuse it.)
  const byDefault = run(["chat", "--model", chatModel, "--device", "cpu", "--prefill-passes", "3"], "");
  expect(byDefault.code).toBe(1);
  expect(byDefault.out).toBe("");
  expect(byDefault.err).toMatch(/^lckv: option '--prefill-passes': applies to prefill "iterative" only, and the prefill is sequential$/m);
});

test("--kv-cache-memory takes a size with a binary suffix, and sets the pool the context is cut to", () => {
  const bad = run(["generate", "hi", "--kv-cache-memory", "12x", "-n", "1", "--device", "cpu"]);
  expect(bad.code).not.toBe(0);
  expect(bad.err).toMatch(/--kv-cache-memory must be a size in bytes, such as 268435456, 256MiB or 2GiB/);
  const small = run(["generate", "hi", "--kv-cache-memory", "64KiB", "--max-context", "256", "-n", "1", "--device", "cpu"]);
  expect(small.code).toBe(1);
  expect(small.err).toMatch(/option '--max-context': 256 tokens do not fit: the K\/V pool \(65536 bytes\) holds \d+ tokens of one sequence/);
  const fits = run(["generate", "hi", "--kv-cache-memory", "0.5 MiB", "-n", "1", "-t", "0", "--device", "cpu"]);
  expect(fits.code).toBe(0);
});

test("serve refuses a port outside [0, 65535], and a port it cannot listen on, in one line each", async () => {
  for (const p of ["99999", "-1", "http"]) {
    const r = run(["serve", "--port", p]);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/--port must be an integer in \[0, 65535\]/);
  }
  // A port another server holds: the model loads, then listening fails with its own message.
  const net = await import("node:net");
  const holder = net.createServer();
  await new Promise<void>((resolve) => holder.listen(0, "127.0.0.1", resolve));
  try {
    const port = String((holder.address() as import("node:net").AddressInfo).port);
    const r = run(["serve", "--model", fixture, "--port", port]);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(new RegExp(`^lckv: cannot listen on 127\\.0\\.0\\.1:${port} \\(--host, --port\\): .*EADDRINUSE`, "m"));
    expect(r.err).not.toMatch(/\n\s+at /);
  } finally {
    await new Promise<void>((resolve) => holder.close(() => resolve()));
  }
});
