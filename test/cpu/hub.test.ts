/**
 * Models by hub id: resolveModel() downloads into a huggingface_hub-layout cache from a hub on
 * 127.0.0.1 (reached through HF_ENDPOINT), serves later calls from the cache, works offline,
 * resumes a dropped download, refuses a wrong size and fails with typed errors; loadModel and the
 * command line take a hub id, and check their options before any request.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import { AddressInfo } from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { AbortError, InvalidOptionError, loadModel, ModelHubError } from "../../lib";
import { resolveModel } from "../../lib/hub";
import { FakeHub } from "../helpers/hub-server";
import { testTempDir } from "../helpers/temp-dir";

process.env.LCKV_QUIET = "1";
const FIXTURES = path.join(__dirname, "..", "fixtures");
const W2 = path.join(FIXTURES, "lckv-w2");
const SHARDED = path.join(FIXTURES, "llama-sharded-f16");
const W2_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"];
const ENV_KEYS = ["HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "XDG_CACHE_HOME"];

let hub: FakeHub;
let endpoint: string;
let w2Commit: string;
let cache: string;
const savedEnv: Record<string, string | undefined> = {};

beforeAll(async () => {
  hub = new FakeHub();
  w2Commit = hub.addRepo("lckv-test/w2", W2).commit;
  hub.addRepo("lckv-test/sharded", SHARDED);
  endpoint = await hub.listen();
});
afterAll(() => hub.close());

beforeEach(() => {
  for (const k of ENV_KEYS) {
    savedEnv[k] = process.env[k];
    delete process.env[k];
  }
  const tmp = testTempDir("hub-");
  cache = path.join(tmp, "hub");
  process.env.HF_HOME = tmp; // no stored token of the machine's user is read
  process.env.HF_HUB_CACHE = cache;
  process.env.HF_ENDPOINT = endpoint;
  hub.requests.length = 0;
  hub.dropOnce = hub.stallOnce = hub.lieSize = hub.token = undefined;
});
afterEach(() => {
  for (const k of ENV_KEYS) {
    if (savedEnv[k] === undefined) delete process.env[k];
    else process.env[k] = savedEnv[k];
  }
});

function expectSameFiles(dir: string, fixture: string, files: string[]): void {
  for (const f of files) expect(fs.readFileSync(path.join(dir, f)).equals(fs.readFileSync(path.join(fixture, f)))).toBe(true);
}

async function rejection(p: Promise<unknown>): Promise<ModelHubError> {
  const e = await p.then(() => undefined, (err: unknown) => err);
  expect(e).toBeInstanceOf(ModelHubError);
  return e as ModelHubError;
}

test("an existing directory, or a path that is no hub id, is returned as it is", async () => {
  expect(await resolveModel(W2)).toBe(W2);
  expect(await resolveModel("/nonexistent/lckv-model")).toBe("/nonexistent/lckv-model");
  expect(hub.requests).toHaveLength(0);
});

test("a download gives a loadable snapshot, in huggingface_hub's layout, of the fixture's bytes", async () => {
  const progress: [number, number][] = [];
  const dir = await resolveModel("lckv-test/w2", { onProgress: (done, total) => progress.push([done, total]) });
  const repoDir = path.join(cache, "models--lckv-test--w2");
  expect(dir).toBe(path.join(repoDir, "snapshots", w2Commit));
  expectSameFiles(dir, W2, W2_FILES);
  expect(fs.existsSync(path.join(dir, "golden.json"))).toBe(false); // only what lckv reads
  expect(fs.readFileSync(path.join(repoDir, "refs", "main"), "utf8")).toBe(w2Commit);
  expect(fs.existsSync(path.join(repoDir, ".no_exist", w2Commit, "special_tokens_map.json"))).toBe(true);
  const link = fs.readlinkSync(path.join(dir, "model.safetensors"));
  expect(link).toMatch(/^\.\.\/\.\.\/blobs\/[0-9a-f]{64}$/); // a relative link to the blob named by the LFS sha256
  expect(fs.readdirSync(path.join(repoDir, "blobs")).filter((b) => b.endsWith(".incomplete"))).toEqual([]);
  const total = W2_FILES.reduce((s, f) => s + fs.statSync(path.join(W2, f)).size, 0);
  expect(progress.at(-1)).toEqual([total, total]);

  const model = await loadModel(dir, { device: "cpu" });
  try {
    expect(model.config.numLayers).toBeGreaterThan(0);
    const r = await model.generate("Hello", { maxNewTokens: 2, temperature: 0 });
    expect(r.tokens).toHaveLength(2);
  } finally {
    await model.dispose();
  }
});

test("a chat template in a file of its own (chat_template.jinja) is downloaded with the tokenizer", async () => {
  const src = testTempDir("hub-chat-");
  for (const f of W2_FILES) fs.copyFileSync(path.join(W2, f), path.join(src, f));
  const template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
  fs.writeFileSync(path.join(src, "chat_template.jinja"), template);
  hub.addRepo("lckv-test/chat", src);
  const dir = await resolveModel("lckv-test/chat");
  expect(fs.readFileSync(path.join(dir, "chat_template.jinja"), "utf8")).toBe(template);
  const model = await loadModel(dir, { device: "cpu" });
  try {
    expect(model.tokenizer!.applyChatTemplate([{ role: "user", content: "Hi" }])).toBe("<|user|>Hi<|assistant|>");
  } finally {
    await model.dispose();
  }
});

test("a sharded model: the index and every shard it names", async () => {
  const dir = await resolveModel("lckv-test/sharded");
  expectSameFiles(dir, SHARDED, ["config.json", "tokenizer.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
  const model = await loadModel(dir, { device: "cpu" });
  await model.dispose();
});

test("a second call is served from the cache without a request, by branch and by commit", async () => {
  const dir = await resolveModel("lckv-test/w2");
  const made = hub.requests.length;
  expect(made).toBeGreaterThan(0);
  expect(await resolveModel("lckv-test/w2")).toBe(dir);
  expect(await resolveModel(`lckv-test/w2@${w2Commit}`)).toBe(dir);
  expect(await resolveModel("lckv-test/w2", { revision: w2Commit })).toBe(dir);
  expect(hub.requests).toHaveLength(made);
});

test("HF_HUB_OFFLINE: the cache serves; without it, a typed error naming the model, and no request", async () => {
  process.env.HF_HUB_OFFLINE = "1";
  const e = await rejection(resolveModel("lckv-test/w2"));
  expect(e.code).toBe("LCKV_MODEL_NOT_CACHED");
  expect(e.model).toBe("lckv-test/w2");
  expect(e.message).toMatch(/lckv-test\/w2.*HF_HUB_OFFLINE/);
  expect(hub.requests).toHaveLength(0);

  delete process.env.HF_HUB_OFFLINE;
  const dir = await resolveModel("lckv-test/w2");
  const made = hub.requests.length;
  process.env.HF_HUB_OFFLINE = "true";
  expect(await resolveModel("lckv-test/w2")).toBe(dir);
  expect(hub.requests).toHaveLength(made);
});

test("when the hub cannot be reached, a complete cached snapshot serves, as in huggingface_hub", async () => {
  const dir = await resolveModel("lckv-test/w2");
  // Without the .no_exist records the cache no longer proves the snapshot complete: the hub is asked.
  fs.rmSync(path.join(cache, "models--lckv-test--w2", ".no_exist"), { recursive: true });
  process.env.HF_ENDPOINT = "http://127.0.0.1:1"; // nothing listens there
  expect(await resolveModel("lckv-test/w2")).toBe(dir);
  const e = await rejection(resolveModel("lckv-test/sharded"));
  expect(e.code).toBe("LCKV_DOWNLOAD_FAILED");
});

test("a dropped connection leaves a .incomplete file that the next call continues with a Range request", async () => {
  const size = fs.statSync(path.join(W2, "model.safetensors")).size;
  hub.dropOnce = { file: "model.safetensors", after: 100_000 };
  const e = await rejection(resolveModel("lckv-test/w2"));
  expect(e.code).toBe("LCKV_DOWNLOAD_FAILED");
  expect(e.file).toBe("model.safetensors");
  const blobs = path.join(cache, "models--lckv-test--w2", "blobs");
  const partial = fs.readdirSync(blobs).filter((b) => b.endsWith(".incomplete"));
  expect(partial).toHaveLength(1);
  const held = fs.statSync(path.join(blobs, partial[0])).size;
  expect(held).toBeGreaterThan(0);
  expect(held).toBeLessThan(size);
  expect(fs.existsSync(path.join(blobs, partial[0].replace(/\.incomplete$/, "")))).toBe(false);

  hub.requests.length = 0;
  const dir = await resolveModel("lckv-test/w2");
  const weightGets = hub.requests.filter((r) => r.url.endsWith("/model.safetensors") && r.headers.range !== "bytes=0-0");
  expect(weightGets.map((r) => r.headers.range)).toEqual([`bytes=${held}-${size - 1}`]);
  // The files the first call completed were not fetched again.
  expect(hub.requests.filter((r) => r.url.endsWith("/config.json"))).toHaveLength(0);
  expectSameFiles(dir, W2, W2_FILES);
  expect(fs.readdirSync(blobs).filter((b) => b.endsWith(".incomplete"))).toEqual([]);
});

test("calls at once for the same model, in this process and in another, all get the whole files; the cache stays sound", async () => {
  // Each used to append the same bytes to the one .incomplete file: the first to finish moved it
  // into place while the others still wrote into it, and the cache kept a config.json of several
  // copies end to end, served from then on without a request.
  const child = (): Promise<string> =>
    new Promise((resolve, reject) => {
      const script = `require(${JSON.stringify(path.join(__dirname, "..", "..", "dist", "hub.js"))}).resolveModel("lckv-test/w2").then((d) => process.stdout.write(d), (e) => { process.stderr.write(e.message); process.exit(1); })`;
      const p = spawn(process.execPath, ["-e", script], { env: process.env, stdio: ["ignore", "pipe", "pipe"] });
      let out = "", err = "";
      p.stdout.on("data", (d) => (out += d));
      p.stderr.on("data", (d) => (err += d));
      p.on("close", (code) => (code === 0 ? resolve(out) : reject(new Error(err))));
    });
  const dirs = await Promise.all([resolveModel("lckv-test/w2"), resolveModel("lckv-test/w2"), resolveModel("lckv-test/w2"), child(), child()]);
  for (const dir of dirs) {
    expect(dir).toBe(path.join(cache, "models--lckv-test--w2", "snapshots", w2Commit));
    expectSameFiles(dir, W2, W2_FILES);
  }
  const repo = path.join(cache, "models--lckv-test--w2");
  expect(fs.readdirSync(path.join(repo, "blobs")).filter((b) => !/^[0-9a-f]+$/.test(b))).toEqual([]);
  expect(fs.readdirSync(path.join(repo, "snapshots", w2Commit)).sort()).toEqual([...W2_FILES].sort());
  expect(fs.lstatSync(path.join(repo, "snapshots", w2Commit, "config.json")).isSymbolicLink()).toBe(true);
  const model = await loadModel("lckv-test/w2", { device: "cpu" });
  await model.dispose();
});

test("a blob's lock left by a process that is gone (killed mid-download) does not stop the next call", async () => {
  const dead = spawn(process.execPath, ["-e", ""]);
  await new Promise((resolve) => dead.on("close", resolve));
  const size = fs.statSync(path.join(W2, "model.safetensors")).size;
  hub.dropOnce = { file: "model.safetensors", after: 100_000 };
  await rejection(resolveModel("lckv-test/w2"));
  const blobs = path.join(cache, "models--lckv-test--w2", "blobs");
  const etag = fs.readdirSync(blobs).find((b) => b.endsWith(".incomplete"))!.replace(/\.incomplete$/, "");
  const locks = path.join(cache, ".locks", "models--lckv-test--w2");
  fs.writeFileSync(path.join(locks, `${etag}.lckv.lock`), JSON.stringify({ pid: dead.pid, host: os.hostname() }));
  const dir = await resolveModel("lckv-test/w2");
  expect(fs.statSync(path.join(dir, "model.safetensors")).size).toBe(size);
  expect(fs.readdirSync(locks)).toEqual([]);
});

test("a cache that cannot be written is a typed error naming it, not a file system error", async () => {
  const file = path.join(path.dirname(cache), "not-a-directory");
  fs.writeFileSync(file, "");
  process.env.HF_HUB_CACHE = file;
  const e = await rejection(resolveModel("lckv-test/w2"));
  expect(e.code).toBe("LCKV_IO");
  expect(e.message).toContain(file);
  expect(e.message).toContain("HF_HUB_CACHE");
});

test("an HF_ENDPOINT that is not an http(s) URL is an InvalidOptionError naming it", async () => {
  for (const value of ["not a url", "huggingface.co", "ftp://example.com"]) {
    process.env.HF_ENDPOINT = value;
    const e = await resolveModel("lckv-test/w2").then(() => undefined, (err: unknown) => err);
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect((e as InvalidOptionError).option).toBe("HF_ENDPOINT");
    expect((e as Error).message).toContain(value);
  }
});

test("a hub that stops answering is a typed error after HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT, not a wait without end", async () => {
  const silent = http.createServer(() => {});
  await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
  try {
    process.env.HF_ENDPOINT = `http://127.0.0.1:${(silent.address() as AddressInfo).port}`;
    process.env.HF_HUB_ETAG_TIMEOUT = "0.3";
    const started = Date.now();
    const e = await rejection(resolveModel("lckv-test/w2"));
    expect(e.code).toBe("LCKV_DOWNLOAD_FAILED");
    expect(e.message).toContain("HF_HUB_ETAG_TIMEOUT");
    expect(Date.now() - started).toBeLessThan(5000);
  } finally {
    silent.closeAllConnections();
    await new Promise((resolve) => silent.close(resolve));
  }
  // A file that stops arriving partway: what came is kept, and the next call resumes from it.
  process.env.HF_ENDPOINT = endpoint;
  process.env.HF_HUB_DOWNLOAD_TIMEOUT = "0.3";
  hub.stallOnce = { file: "model.safetensors", after: 100_000 };
  const e = await rejection(resolveModel("lckv-test/w2"));
  expect(e.code).toBe("LCKV_DOWNLOAD_FAILED");
  expect(e.file).toBe("model.safetensors");
  expect(e.message).toContain("HF_HUB_DOWNLOAD_TIMEOUT");
  expectSameFiles(await resolveModel("lckv-test/w2"), W2, W2_FILES);
});

test("a file whose size is not the size the hub reported is refused and not moved into place", async () => {
  hub.lieSize = { file: "model.safetensors", extra: 7 };
  const e = await rejection(resolveModel("lckv-test/w2"));
  expect(e.code).toBe("LCKV_DOWNLOAD_SIZE_MISMATCH");
  expect(e.file).toBe("model.safetensors");
  expect(e.message).toMatch(/model\.safetensors.*lckv-test\/w2.*475400 bytes.*475407/);
  const repoDir = path.join(cache, "models--lckv-test--w2");
  const blobs = fs.readdirSync(path.join(repoDir, "blobs"));
  expect(blobs.filter((b) => /^[0-9a-f]{64}$/.test(b))).toEqual([]);
  expect(fs.existsSync(path.join(repoDir, "snapshots", w2Commit, "model.safetensors"))).toBe(false);
  expect(fs.existsSync(path.join(repoDir, "refs", "main"))).toBe(false);
});

test("a mistyped local path of a hub id's form is said to be no local directory either, offline or with the hub unreachable", async () => {
  process.env.HF_ENDPOINT = "http://127.0.0.1:1"; // nothing listens there
  const unreachable = await rejection(resolveModel("models/no-such-dir"));
  expect(unreachable.code).toBe("LCKV_DOWNLOAD_FAILED");
  expect(unreachable.message).toMatch(/could not download the file list of 'models\/no-such-dir'.*; nor is it a local directory$/);
  process.env.HF_HUB_OFFLINE = "1";
  const offline = await rejection(resolveModel("models/no-such-dir"));
  expect(offline.code).toBe("LCKV_MODEL_NOT_CACHED");
  expect(offline.message).toMatch(/HF_HUB_OFFLINE is set; nor is it a local directory$/);
});

test("an unknown model or revision is a typed error naming it", async () => {
  const e = await rejection(resolveModel("lckv-test/no-such-model"));
  expect(e.code).toBe("LCKV_MODEL_NOT_FOUND");
  expect(e.model).toBe("lckv-test/no-such-model");
  expect(e.message).toMatch(/lckv-test\/no-such-model/);
  const r = await rejection(resolveModel("lckv-test/w2@no-such-branch"));
  expect(r.code).toBe("LCKV_MODEL_NOT_FOUND");
  expect(r.message).toMatch(/no-such-branch/);
});

test("HF_TOKEN is sent as an Authorization header, to the hub's own origin", async () => {
  hub.token = "hf_secret";
  const e = await rejection(resolveModel("lckv-test/w2"));
  expect(e.code).toBe("LCKV_MODEL_NOT_FOUND");
  expect(e.message).toMatch(/HF_TOKEN/);

  hub.requests.length = 0;
  process.env.HF_TOKEN = "hf_secret";
  await resolveModel("lckv-test/w2");
  expect(hub.requests.length).toBeGreaterThan(0);
  expect(hub.requests.every((r) => r.headers.authorization === "Bearer hf_secret")).toBe(true);
});

test("a token of another form (a private hub's) is sent too", async () => {
  hub.token = "private-hub-token";
  process.env.HF_TOKEN = "private-hub-token";
  expectSameFiles(await resolveModel("lckv-test/w2"), W2, W2_FILES);
});

test("an aborted signal stops the download with AbortError", async () => {
  const controller = new AbortController();
  controller.abort();
  await expect(resolveModel("lckv-test/w2", { signal: controller.signal })).rejects.toThrow(AbortError);
});

test("a revision given twice must agree", async () => {
  await expect(resolveModel("lckv-test/w2@main", { revision: "v1" })).rejects.toThrow(/revision/);
});

test("loadModel takes a hub id: the download loads and generates the tokens the fixture directory does (greedy)", async () => {
  const progress: [number, number, string][] = [];
  const byId = await loadModel("lckv-test/w2", { device: "cpu", onDownloadProgress: (done, total, file) => progress.push([done, total, file]) });
  const byDir = await loadModel(W2, { device: "cpu" });
  try {
    expect(byId.directory).toBe(path.join(cache, "models--lckv-test--w2", "snapshots", w2Commit));
    const g = { maxNewTokens: 12, temperature: 0 };
    const a = await byId.generate("Once upon a time", g);
    const b = await byDir.generate("Once upon a time", g);
    expect(a.tokens).toHaveLength(12);
    expect(a.tokens).toEqual(b.tokens);
  } finally {
    await byId.dispose();
    await byDir.dispose();
  }
  const total = W2_FILES.reduce((sum, f) => sum + fs.statSync(path.join(W2, f)).size, 0);
  expect(progress.at(-1)).toEqual([total, total, "model.safetensors"]);

  // From the cache now, by commit: no request, no download progress.
  const made = hub.requests.length;
  progress.length = 0;
  const again = await loadModel("lckv-test/w2", { device: "cpu", revision: w2Commit, onDownloadProgress: () => progress.push([0, 0, ""]) });
  await again.dispose();
  expect(hub.requests).toHaveLength(made);
  expect(progress).toEqual([]);
});

test("loadModel checks every option before it asks the hub for anything", async () => {
  const bad: [Record<string, unknown>, string][] = [
    [{ revision: 5 }, "revision"],
    [{ revision: "" }, "revision"],
    [{ onDownloadProgress: "yes" }, "onDownloadProgress"],
    [{ signal: {} }, "signal"],
    [{ device: "tpu" }, "device"],
    [{ maxBatch: 0 }, "maxBatch"],
  ];
  for (const [options, name] of bad) {
    const e = await loadModel("lckv-test/w2", options as never).then(() => undefined, (err: unknown) => err);
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect((e as InvalidOptionError).option).toBe(name);
    expect((e as Error).message).toMatch(new RegExp(`option '${name}'`));
  }
  expect(hub.requests).toHaveLength(0);
  expect(fs.existsSync(cache)).toBe(false);
  // A revision names a commit of a hub model: with a local directory it is an error.
  await expect(loadModel(W2, { revision: "main" })).rejects.toThrow(/option 'revision': applies to a hub id only/);
  // A hub id the hub does not know, and no local directory of that name: both are said.
  const e = await rejection(loadModel("lckv-test/no-such-model", { device: "cpu" }));
  expect(e.code).toBe("LCKV_MODEL_NOT_FOUND");
  expect(e.message).toMatch(/no model 'lckv-test\/no-such-model'.*nor is it a local directory/);
});

test("loadModel with an aborted signal stops with AbortError, for a hub id and a directory", async () => {
  const controller = new AbortController();
  controller.abort();
  await expect(loadModel("lckv-test/w2", { device: "cpu", signal: controller.signal })).rejects.toThrow(AbortError);
  await expect(loadModel(W2, { device: "cpu", signal: controller.signal })).rejects.toThrow(AbortError);
});

// The command line as a user runs it (dist/cli.js). Spawned, not spawnSync: the hub answers from
// this process's event loop.
function runCli(args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  const root = path.join(__dirname, "..", "..");
  const env = { ...process.env, HF_ENDPOINT: endpoint, HF_HUB_CACHE: cache, LCKV_QUIET: "1" };
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(root, "dist", "cli.js"), ...args], { cwd: root, env });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, out, err }));
  });
}

test("the CLI takes a hub id: lckv info --model org/name downloads the model and reports it", async () => {
  const r = await runCli(["info", "--model", "lckv-test/w2", "--json"]);
  expect(r.err).toBe("");
  expect(r.code).toBe(0);
  const info = JSON.parse(r.out);
  expect(info.layerTypes).toBe("0_4_4_4_4_5");
  expect(info.directory).toBe(path.join(cache, "models--lckv-test--w2", "snapshots", w2Commit));
  const missing = await runCli(["info", "--model", "lckv-test/w2", "--revision", "no-such-branch"]);
  expect(missing.code).toBe(1);
  expect(missing.err).toMatch(/^lckv: .*no-such-branch/);
});
