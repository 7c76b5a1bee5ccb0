#!/usr/bin/env node
/**
 * The lckv command line:
 *   lckv generate [prompt] [--model dir|id] [--max-new-tokens N] [--temperature T] [--device cpu|cuda] [--seed S]
 *   lckv info [--model dir|id]
 *   lckv chat [--model dir|id] [--system text] ...
 *   lckv eval-ppl --text file [--model dir|id] [--window N] [--prefill mode]
 *   lckv serve [--model dir|id] [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--max-queue N] [--max-batch N] [--queue-timeout MS] [--write-stall-timeout MS]
 * Every command that runs a model takes --device, --dtype, --kv-dtype and --kv-cache-memory.
 * --model takes a directory or a hub id (org/name[@revision], or --revision), downloaded into the
 * Hugging Face cache. Option errors come before any output; long jobs (a download, a load) show a
 * progress bar on a terminal; generate
 * and chat end with a stats line on stderr (LCKV_QUIET=1 or --quiet leaves it out).
 */
import { Command, InvalidArgumentError, Option } from "commander";
import { SingleBar } from "cli-progress";
import { formatLayerTypes } from "./plan";
import { ContextOverflowError, InvalidInputError, InvalidOptionError, LckvError } from "./errors";
import { KV_CACHE_DTYPES, KvCacheDtype } from "./kv-cache-dtype";
import { DType, DTYPES, loadModel, LoadOptions } from "./load-model";
import { Model } from "./model";
import { checkServerOptions, createServer } from "./server/server";
import { condenseModel, partialDirectory } from "./condense/condense";
import { evaluatePerplexity } from "./eval";
import type { GenerationStream } from "./generation-stream";
import { GenerateOptions, PREFILL_MODES, resolveGenerateOptions } from "./options";
import { refuseUnusedPrefillOptions } from "./prefill-options";
import type { GenerateResult, StreamChunk } from "./types";
import * as fs from "node:fs";
import * as path from "node:path";
import * as readline from "node:readline";

function intArg(name: string) {
  return (v: string) => {
    if (!/^-?\d+$/.test(v)) throw new InvalidArgumentError(`${name} must be an integer`);
    return Number(v);
  };
}
function posIntArg(name: string) {
  return (v: string) => {
    if (!/^\d+$/.test(v) || Number(v) < 1) throw new InvalidArgumentError(`${name} must be a positive integer`);
    return Number(v);
  };
}
function minIntArg(name: string, min: number) {
  return (v: string) => {
    if (!/^\d+$/.test(v) || Number(v) < min) throw new InvalidArgumentError(`${name} must be an integer >= ${min}`);
    return Number(v);
  };
}
function portArg(name: string) {
  return (v: string) => {
    if (!/^\d+$/.test(v) || Number(v) > 65535) throw new InvalidArgumentError(`${name} must be an integer in [0, 65535]`);
    return Number(v);
  };
}
// A size in bytes: an integer, or a number with a binary suffix (KiB, MiB, GiB, TiB; K, M, G, T alike).
function bytesArg(name: string) {
  const units: Record<string, number> = { "": 1, k: 2 ** 10, kib: 2 ** 10, m: 2 ** 20, mib: 2 ** 20, g: 2 ** 30, gib: 2 ** 30, t: 2 ** 40, tib: 2 ** 40 };
  return (v: string) => {
    const m = /^(\d+(?:\.\d+)?)\s*([a-z]*)$/i.exec(v.trim());
    const unit = m ? units[m[2].toLowerCase()] : undefined;
    const n = m && unit !== undefined ? Math.floor(Number(m[1]) * unit) : NaN;
    if (!Number.isSafeInteger(n) || n < 1) throw new InvalidArgumentError(`${name} must be a size in bytes, such as 268435456, 256MiB or 2GiB`);
    return n;
  };
}
function numArg(name: string) {
  return (v: string) => {
    const n = Number(v);
    if (v.trim() === "" || !Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number`);
    return n;
  };
}

// A reader that stops early (`lckv generate ... | head`) closes the pipe: generation stops
// quietly, as in other command-line tools, instead of an unhandled EPIPE.
let stdoutClosed = false;
process.stdout.on("error", (e: NodeJS.ErrnoException) => {
  if (e.code !== "EPIPE") throw e;
  stdoutClosed = true;
});
// The same for stderr (`... 2>&1 | head`): what would have gone there is dropped.
process.stderr.on("error", (e: NodeJS.ErrnoException) => {
  if (e.code !== "EPIPE") throw e;
});

/**
 * Ctrl-C while `undo` is registered runs it before the process exits 130, as it would have on
 * the signal: a progress bar gives the terminal back its cursor and line wrap (it hid them), a
 * run with files half written removes them. Returns what unregisters it; with nothing
 * registered the signal has its default effect again (`serve` installs its own).
 */
const interruptUndos = new Set<() => void>();
function onInterrupt() {
  for (const undo of interruptUndos) undo();
  process.exit(130);
}
function untilInterrupted(undo: () => void): () => void {
  if (interruptUndos.size === 0) process.on("SIGINT", onInterrupt);
  interruptUndos.add(undo);
  return () => {
    interruptUndos.delete(undo);
    if (interruptUndos.size === 0) process.off("SIGINT", onInterrupt);
  };
}

/** A progress bar on stderr (a terminal only), which Ctrl-C stops, so that the cursor comes back. */
function progressBar(format: string): SingleBar | undefined {
  if (!process.stderr.isTTY) return undefined;
  const bar = new SingleBar({ format, stream: process.stderr, clearOnComplete: true, hideCursor: true });
  const start = bar.start.bind(bar);
  const stop = bar.stop.bind(bar);
  let unregister: (() => void) | undefined;
  bar.start = (...args: Parameters<SingleBar["start"]>) => {
    unregister ??= untilInterrupted(stop);
    start(...args);
  };
  bar.stop = () => {
    stop();
    unregister?.();
    unregister = undefined;
  };
  return bar;
}

async function open(opts: {
  model?: string;
  revision?: string;
  device?: "auto" | "cpu" | "cuda";
  dtype?: DType;
  kvDtype?: KvCacheDtype;
  kvCacheMemory?: number;
  maxContext?: number;
  maxQueue?: number;
  queueTimeout?: number;
  maxBatch?: number;
}): Promise<Model> {
  const load: LoadOptions = { device: opts.device ?? "auto" };
  if (opts.dtype !== undefined) load.dtype = opts.dtype;
  if (opts.kvDtype !== undefined) load.kvCacheDtype = opts.kvDtype;
  if (opts.kvCacheMemory !== undefined) load.kvCacheMemory = opts.kvCacheMemory;
  if (opts.queueTimeout !== undefined) load.queueTimeout = opts.queueTimeout;
  if (opts.maxContext !== undefined) load.maxContext = opts.maxContext;
  if (opts.maxQueue !== undefined) load.maxQueue = opts.maxQueue;
  if (opts.maxBatch !== undefined) load.maxBatch = opts.maxBatch;
  if (opts.revision !== undefined) load.revision = opts.revision;
  const bar = progressBar("loading {bar} {percentage}%");
  const download = progressBar("downloading {file} {bar} {percentage}% {bytes}");
  if (bar && download) {
    // Each bar is started at its first report, after loadModel has chosen the device: its one-line
    // notice (running on the CPU, and why) then prints above the bars instead of inside them.
    let started = false;
    let downloading = false;
    load.onDownloadProgress = (done, total, file) => {
      const payload = { file, bytes: `${formatBytes(done)} of ${formatBytes(total)}` };
      if (!downloading) download.start(total, done, payload);
      downloading = true;
      download.update(done, payload);
    };
    load.onProgress = (f) => {
      if (!started) {
        download.stop();
        bar.start(100, 0);
      }
      started = true;
      bar.update(Math.round(f * 100));
    };
    try {
      return await loadModel(opts.model, load);
    } finally {
      download.stop();
      bar.stop();
    }
  }
  return loadModel(opts.model, load);
}

// A text file a flag names, as UTF-8: bytes that are not (a binary file, another encoding) are
// refused by name rather than scored or fitted as U+FFFD.
function readTextFile(flag: string, file: string): string {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (e) {
    throw new LckvError("LCKV_IO", `cannot read ${flag} ${file}: ${(e as Error).message}`);
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new InvalidInputError(`${flag} ${file} is not UTF-8 text`);
  }
}

// The sampling options of generate and chat as the library takes them, checked before any output
// or model load, so that a bad value fails first (resolveGenerateOptions names the option).
function samplingOptions(o: Record<string, unknown>): GenerateOptions {
  const g: GenerateOptions = {
    maxNewTokens: o.maxNewTokens as number | undefined,
    temperature: o.temperature as number | undefined,
    topK: o.topK as number | undefined,
    topP: o.topP as number | undefined,
    minP: o.minP as number | undefined,
    repetitionPenalty: o.repetitionPenalty as number | undefined,
    seed: o.seed as number | undefined,
    prefill: o.prefill as GenerateOptions["prefill"],
    prefillPasses: o.prefillPasses as number | undefined,
    prefillTolerance: o.prefillTolerance as number | undefined,
  };
  for (const k of Object.keys(g) as (keyof GenerateOptions)[]) if (g[k] === undefined) delete g[k];
  resolveGenerateOptions(g, { maxNewTokens: 1, temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, prefill: "sequential", prefillPasses: 1 });
  // A flag of another mode than the one given fails here too; without --prefill the model's
  // default mode decides, once it is loaded.
  refuseUnusedPrefillOptions(null, g);
  return g;
}

// Streams one completion to stdout and returns its result (finish reason, usage, timings). A
// reader that closed stdout ends the request: its pages go back. `echo` (generate's prompt) is
// written with the first chunk, or at the end when there is none, so that a request refused
// before it starts (a prompt longer than the context, a full cache) leaves stdout empty.
async function streamTo(stream: GenerationStream, echo = ""): Promise<GenerateResult> {
  const writeEcho = () => {
    if (echo !== "" && !stdoutClosed) process.stdout.write(echo);
    echo = "";
  };
  for await (const chunk of stream as AsyncIterable<StreamChunk>) {
    writeEcho();
    if (stdoutClosed) break;
    process.stdout.write(chunk.text);
  }
  writeEcho();
  return stream.result;
}

// The library's timings: tokens/s counts the tokens after the first, over the time after it (the
// decode rate, which the prompt's prefill, in the time to the first token, does not dilute).
// A reply that ended at the context, not at --max-new-tokens, says so: both are finishReason "length".
function printStats(r: GenerateResult, quiet: boolean, maxContext: number) {
  if (quiet || process.env.LCKV_QUIET) return;
  const tokens = r.usage.completionTokens;
  const rate = tokens > 1 ? `, ${r.timings.tokensPerSecond.toFixed(1)} tokens/s` : "";
  const ttft = tokens > 0 ? `, first token after ${r.timings.timeToFirstTokenMs.toFixed(0)} ms` : "";
  const atContext = r.finishReason === "length" && r.usage.promptTokens + tokens >= maxContext ? `; stopped at the context (${maxContext} tokens)` : "";
  process.stderr.write(`lckv: ${tokens} tokens in ${(r.timings.totalMs / 1000).toFixed(2)} s${rate}${ttft}${atContext}\n`);
}

function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

const program = new Command();
const { version } = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "package.json"), "utf8")) as { version: string };
program.name("lckv").description("Run language models with layer-condensed KV caches").version(version).showHelpAfterError();

// Options several commands share.
const deviceOption = () => new Option("--device <device>", "where to run").choices(["auto", "cpu", "cuda"]).default("auto");
const dtypeOption = () =>
  new Option("--dtype <type>", "the weights' type on the device (default: bf16 on CUDA, the checkpoint's on the CPU)").choices([...DTYPES]);
const kvDtypeOption = () => new Option("--kv-dtype <type>", "the K/V cache's value type (default: bf16)").choices([...KV_CACHE_DTYPES]);
const kvMemoryOption = () =>
  new Option("--kv-cache-memory <size>", "bytes of the K/V pool all sequences share, e.g. 2GiB (default: room for 32 full contexts, at most 80% of free GPU memory; on the CPU 25% of host memory)").argParser(
    bytesArg("--kv-cache-memory"),
  );
const modelOption = () =>
  new Option(
    "-m, --model <dir|id>",
    "a Hugging Face model directory, or a hub id org/name[@revision] downloaded into the Hugging Face cache " +
      "(HF_HUB_CACHE; HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE honoured) (default: the embedded model)",
  ).argParser((v: string) => {
    // An empty path would be read as the working directory.
    if (v.trim() === "") throw new InvalidArgumentError("--model must not be empty");
    return v;
  });
const revisionOption = () => new Option("--revision <rev>", "branch, tag or commit of a --model given by hub id (default: main)");
const quietOption = () => new Option("-q, --quiet", "no stats line on stderr");
// Sampling and prefill options generate and chat share.
function addSamplingOptions(c: Command): Command {
  return addPrefillOptions(c)
    .option("-n, --max-new-tokens <n>", "tokens to generate", intArg("--max-new-tokens"))
    .option("-t, --temperature <t>", "sampling temperature (0 = greedy)", numArg("--temperature"))
    .option("--top-k <k>", "keep the k most likely tokens", intArg("--top-k"))
    .option("--top-p <p>", "nucleus sampling mass", numArg("--top-p"))
    .option("--min-p <p>", "drop tokens below p times the most likely", numArg("--min-p"))
    .option("--repetition-penalty <r>", "penalise tokens already in the text", numArg("--repetition-penalty"))
    .option("-s, --seed <s>", "random seed for reproducible sampling", intArg("--seed"))
    .option("--max-context <n>", "context length in tokens", intArg("--max-context"));
}
// The prefill options of every command that prefills a prompt (generate, chat, eval-ppl, serve).
function addPrefillOptions(c: Command): Command {
  return c
    .addOption(new Option("--prefill <mode>", "LCKV prompt prefill (default: the device's, docs/usage.md)").choices([...PREFILL_MODES]))
    .addOption(new Option("--prefill-passes <n>", "passes for --prefill iterative").argParser(intArg("--prefill-passes")))
    .addOption(
      new Option("--prefill-tolerance <x>", "for --prefill fixed-point: stop when no K/V value read from above moved by more than x times the largest (default 1e-6)").argParser((v: string) => {
        const x = numArg("--prefill-tolerance")(v);
        if (x < 0 || x >= 1) throw new InvalidArgumentError(`--prefill-tolerance must be a number in [0, 1), got ${v}`);
        return x;
      }),
    );
}

addSamplingOptions(
  program
    .command("generate")
    .description("stream a completion of the prompt to stdout")
    .argument("[prompt]", "text to continue (default: stdin, less its final newline; a terminal or an empty stdin is refused)")
    .addOption(modelOption())
    .addOption(revisionOption()),
)
  .addOption(deviceOption())
  .addOption(dtypeOption())
  .addOption(kvDtypeOption())
  .addOption(kvMemoryOption())
  .addOption(quietOption())
  .action(async (prompt: string | undefined, o) => {
    const g = samplingOptions(o);
    if (prompt === undefined && process.stdin.isTTY) {
      // Nothing to continue: a forgotten prompt would otherwise print text from nothing.
      throw new InvalidInputError("no prompt: give it as the argument or on stdin");
    }
    if (prompt === undefined) {
      const chunks: Buffer[] = [];
      for await (const c of process.stdin) chunks.push(c as Buffer);
      // The newline that ends what `echo` or a text file gives is the end of the input, not a
      // line break to continue from (one only: a blank line the user wrote stays).
      prompt = Buffer.concat(chunks).toString("utf8").replace(/\r?\n$/, "");
      // An empty pipe (a file that is missing or empty) is a forgotten prompt too; an empty
      // argument ("") is the way to ask for text from nothing.
      if (prompt === "") throw new InvalidInputError("no prompt: stdin was empty (give \"\" as the argument to continue from nothing)");
    }
    await using model = await open(o);
    const text = prompt ?? "";
    const result = await streamTo(model.stream(text, g), text);
    if (!stdoutClosed) process.stdout.write("\n");
    printStats(result, o.quiet, model.maxContext);
  });

// What a chat line can do besides talk, said where the chat starts and where a turn is refused.
const CHAT_KEYS = "/reset clears the conversation; Ctrl-C stops a reply; an empty line, Ctrl-D or Ctrl-C at the prompt ends the chat";

addSamplingOptions(
  program
    .command("chat")
    .description("talk to a model in the terminal, through its chat template, streaming each reply (/reset clears the conversation)")
    .addOption(modelOption())
    .addOption(revisionOption())
    .option("--system <text>", "a system message that opens the conversation"),
)
  .addOption(deviceOption())
  .addOption(dtypeOption())
  .addOption(kvDtypeOption())
  .addOption(kvMemoryOption())
  .addOption(quietOption())
  .action(async (o) => {
    const g = samplingOptions(o);
    await using model = await open(o);
    // Without --prefill, a flag of another mode than the model's default is refused now, not
    // after the first message is typed.
    refuseUnusedPrefillOptions(model, g);
    const newSession = () => model.createChatSession(o.system ? { system: o.system } : {});  // no template: fails here
    let session = newSession();
    // Lines are read through the interface's iterator, which holds the lines that arrive while
    // a reply streams (a pasted or piped conversation loses none).
    const tty = !!process.stdin.isTTY;
    const rl = readline.createInterface({ input: process.stdin, terminal: tty, output: tty ? process.stdout : undefined });
    // A terminal in raw mode sends Ctrl-C to readline, not as a signal: it stops the reply that
    // streams (as llama.cpp's first Ctrl-C does), or at the prompt ends the chat, with 130.
    let reply: AbortController | undefined;
    rl.on("SIGINT", () => {
      if (reply) return reply.abort();
      process.stdout.write("\n");
      process.exitCode = 130;
      rl.close();
    });
    try {
      if (tty) process.stdout.write(`(${CHAT_KEYS})\n> `);
      for await (const line of rl) {
        if (line.trim() === "") break;
        if (line.trim() === "/reset") {
          // A new conversation (the system message kept): the way on once the context is full.
          session.dispose();
          session = newSession();
          process.stderr.write("lckv: the conversation is cleared\n");
          if (tty) process.stdout.write("> ");
          continue;
        }
        // The session keeps its sequence between turns: each turn prefills only its new tokens.
        // A turn the context cannot hold is refused before it starts and leaves the conversation
        // as it was, so the chat goes on (a shorter message may still fit).
        let result: GenerateResult;
        reply = new AbortController();
        try {
          result = await streamTo(session.send(line, { ...g, signal: reply.signal }));
        } catch (e) {
          if (!(e instanceof ContextOverflowError)) throw e;
          process.stderr.write(`lckv: ${e.message}; that message was not sent (${CHAT_KEYS})\n`);
          if (tty) process.stdout.write("> ");
          continue;
        } finally {
          reply = undefined;
        }
        process.stdout.write("\n");
        printStats(result, o.quiet, model.maxContext);
        if (stdoutClosed) break;
        if (tty) process.stdout.write("> ");
      }
    } finally {
      rl.close();
      session.dispose();
    }
  });

program
  .command("info")
  .description("print the architecture, layer pattern and KV cache cost of a model")
  .addOption(modelOption())
  .addOption(revisionOption())
  .option("--json", "print JSON")
  .addOption(deviceOption())
  .addOption(dtypeOption())
  .addOption(kvDtypeOption())
  .addOption(kvMemoryOption())
  .action(async (o) => {
    await using model = await open(o);
    const c = model.config;
    const info = {
      directory: model.directory,
      architecture: c.architecture,
      modelType: c.modelType,
      device: model.device,
      layers: c.numLayers,
      hiddenSize: c.hiddenSize,
      heads: c.numHeads,
      kvHeads: c.numKvHeads,
      headDim: c.headDim,
      vocabSize: c.vocabSize,
      layerTypes: formatLayerTypes(c.plan),
      kvLayers: c.kvLayers,
      cyclicGroup: c.plan.cyclicGroup,
      // Per layer: which layers see only earlier tokens' K/V (the diagonal masked), and each
      // layer's sliding window in tokens (0: none).
      diagonalMasked: c.plan.strict.flatMap((s, i) => (s ? [i] : [])),
      slidingWindow: c.plan.window,
      kvCacheDtype: model.kvCacheDtype,
      kvBytesPerToken: model.kvBytesPerToken,
      standardKvBytesPerToken: model.standardKvBytesPerToken,
      kvReduction: model.standardKvBytesPerToken / model.kvBytesPerToken,
      // Every type's cost (null: the head size cannot take it).
      kvBytesPerTokenByDtype: Object.fromEntries(KV_CACHE_DTYPES.map((t) => [t, model.kvBytesPerTokenIn(t)])),
      maxContext: model.maxContext,
    };
    if (o.json) {
      process.stdout.write(JSON.stringify(info, null, 2) + "\n");
      return;
    }
    const rows: [string, string][] = [
      ["model", info.directory],
      ["architecture", `${info.architecture} (${info.modelType})`],
      ["device", info.device],
      ["layers", `${info.layers} (hidden ${info.hiddenSize}, ${info.heads} heads, ${info.kvHeads} KV heads of ${info.headDim})`],
      ["vocabulary", String(info.vocabSize)],
      ["layer types", info.layerTypes],
      ["KV layers", `${info.kvLayers.join(", ")} (${info.kvLayers.length} of ${info.layers})`],
      ["cyclic group", info.cyclicGroup ? `layers ${info.cyclicGroup.low}..${info.cyclicGroup.high}` : "none"],
      ["diagonal masked", info.diagonalMasked.length ? `layers ${info.diagonalMasked.join(", ")}` : "none"],
      ["sliding window", windowsText(info.slidingWindow)],
      ["KV bytes/token", `${formatBytes(info.kvBytesPerToken)} in ${info.kvCacheDtype}${info.kvReduction === 1 ? " (a standard cache: every layer's K/V)" : ` (standard cache: ${formatBytes(info.standardKvBytesPerToken)}, ${info.kvReduction.toFixed(2)}x less)`}`],
      [
        "by K/V type",
        KV_CACHE_DTYPES.map((t) => {
          const b = info.kvBytesPerTokenByDtype[t];
          return `${t} ${b === null ? "(head size)" : formatBytes(b)}`;
        }).join(", "),
      ],
      ["max context", `${info.maxContext} tokens`],
    ];
    const w = Math.max(...rows.map((r) => r[0].length));
    for (const [k, v] of rows) process.stdout.write(`${k.padEnd(w)}  ${v}\n`);
  });

program
  .command("condense")
  .description("turn a pretrained standard model into a condensed-K/V one without training (docs/condense.md)")
  .argument("<model>", "a Hugging Face model directory, or a hub id org/name[@revision]")
  .requiredOption("--out <dir>", "the directory to write (must not exist)")
  .requiredOption("--calib <file>", "UTF-8 calibration text (its last tenth is held back to check the result)")
  .option("--kv-layers <n>", "layers that keep their K/V (this or --ratio)", posIntArg("--kv-layers"))
  .option("--ratio <r>", "the fraction of the layers' K/V kept, in (0, 1) (this or --kv-layers)", numArg("--ratio"))
  .addOption(new Option("--method <m>", "linear: fitted maps folded into W_q and W_o; share: read the K/V as they are").choices(["linear", "share"]).default("linear"))
  .option("--calib-tokens <n>", "calibration tokens read (default 16384)", posIntArg("--calib-tokens"))
  .option("--json", "print the report as JSON")
  .addOption(deviceOption())
  .action(async (model: string, o) => {
    if ((o.kvLayers === undefined) === (o.ratio === undefined)) throw new InvalidOptionError("kvLayers", "give exactly one of --kv-layers and --ratio");
    const text = readTextFile("--calib", o.calib);
    const bar = progressBar("{phase} {bar} {value}/{total}");
    let phase = "";
    let report;
    // Interrupted, the run leaves no half-written model behind.
    const unregisterCleanup = untilInterrupted(() => fs.rmSync(partialDirectory(o.out), { recursive: true, force: true }));
    try {
      report = await condenseModel(model, {
        out: o.out,
        calibrationText: text,
        calibrationFile: o.calib,
        kvLayers: o.kvLayers,
        ratio: o.ratio,
        method: o.method,
        device: o.device,
        calibrationTokens: o.calibTokens,
        onProgress: (p, done, total) => {
          if (p !== phase) {
            bar?.stop();
            bar?.start(total, 0, { phase: p === "calibrate" ? "calibrating" : "checking" });
            phase = p;
          }
          bar?.update(done);
        },
      });
    } finally {
      bar?.stop();
      unregisterCleanup();
    }
    if (o.json) process.stdout.write(JSON.stringify(report, null, 2) + "\n");
    else
      process.stdout.write(
        `wrote ${report.out}: layer_types ${report.layerTypes.join("_")} (${report.kvLayers.length} of ${report.layerTypes.length} layers keep K/V); ` +
          `held-back perplexity ${report.perplexity.source.toFixed(4)} -> ${report.perplexity.condensed.toFixed(4)}\n`,
      );
  });

addPrefillOptions(
  program
    .command("eval-ppl")
    .description("perplexity of a text file, in non-overlapping windows: window w scores tokens 1..n-1 of tokens [w*n, (w+1)*n) from their prefix in the window")
    .requiredOption("--text <file>", "UTF-8 text to score")
    .addOption(modelOption())
    .addOption(revisionOption())
    .option("--window <n>", "tokens per window (default: the model's context)", posIntArg("--window"))
    .option("--max-tokens <n>", "score only the first n tokens (at least 2: the first is only context)", minIntArg("--max-tokens", 2))
    .option("--json", "print JSON"),
)
  .addOption(deviceOption())
  .addOption(dtypeOption())
  .addOption(kvDtypeOption())
  .addOption(kvMemoryOption())
  .action(async (o) => {
    const text = readTextFile("--text", o.text);
    if (text === "") throw new InvalidInputError(`--text ${o.text} is empty: perplexity needs at least two tokens of text`);
    await using model = await open(o);
    if (!model.tokenizer) throw new LckvError("LCKV_NO_TOKENIZER", `${model.directory} has no tokenizer.json`);
    let ids = model.tokenizer.encode(text, { addSpecialTokens: false });
    if (o.maxTokens !== undefined) ids = ids.slice(0, o.maxTokens);
    const bar = progressBar("scoring {bar} {value}/{total} windows, {eta_formatted} left");
    bar?.start(Math.ceil(ids.length / (o.window ?? model.maxContext)), 0);
    let r;
    try {
      r = await evaluatePerplexity(model, ids, {
        window: o.window,
        prefill: o.prefill,
        prefillPasses: o.prefillPasses,
        prefillTolerance: o.prefillTolerance,
        onWindow: (done) => bar?.update(done),
      });
    } finally {
      bar?.stop();
    }
    const sorted = [...r.passes].sort((a, b) => a - b);
    const summary = {
      model: model.directory,
      // What the figure depends on beside the text: where it ran, the weights' type asked for, the cache's.
      device: model.device,
      dtype: o.dtype ?? "auto",
      kvCacheDtype: model.kvCacheDtype,
      text: o.text,
      tokens: ids.length,
      window: o.window ?? model.maxContext,
      prefill: o.prefill ?? model.generationDefaults().prefill,
      ...(o.prefillTolerance !== undefined ? { prefillTolerance: o.prefillTolerance } : {}),
      perplexity: r.perplexity,
      meanNll: r.meanNll,
      predictedTokens: r.predictedTokens,
      windows: r.windows,
      passesMedian: sorted.length ? sorted[Math.floor((sorted.length - 1) / 2)] : 0,
      passesMax: sorted.length ? sorted[sorted.length - 1] : 0,
    };
    if (o.json) process.stdout.write(JSON.stringify(summary, null, 2) + "\n");
    else process.stdout.write(`perplexity ${r.perplexity.toFixed(4)} over ${r.predictedTokens} predicted tokens in ${r.windows} window${r.windows === 1 ? "" : "s"} (${model.device}, ${model.kvCacheDtype} K/V cache)\n`);
  });

addPrefillOptions(
  program
    .command("serve")
    .description("serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)")
    .addOption(modelOption())
    .addOption(revisionOption())
    .option("--host <host>", "address to listen on", "127.0.0.1")
    .option("--port <port>", "port to listen on (0: any free port)", portArg("--port"), 8080)
    .option("--api-key <key>", "require 'Authorization: Bearer <key>' on every request but /health and /metrics")
    .option("--allowed-origins <origins>", "comma-separated origins whose pages a browser lets call the server (CORS; default: *, any; '': none)")
    .option("--max-queue <n>", "requests that may wait for K/V pages at once; the next is answered 429", intArg("--max-queue"))
    .option("--max-batch <n>", "sequences in one decode step at most (loadModel's maxBatch; default: its default for the device)", posIntArg("--max-batch"))
    .option("--queue-timeout <ms>", "ms a request may wait for K/V pages before it is answered 503 (default: no limit)", intArg("--queue-timeout"))
    .option("--write-stall-timeout <ms>", "ms a stream waits for a client that stopped reading before it drops it, freeing its K/V pages (default: 30000)", intArg("--write-stall-timeout"))
    .option("--request-timeout <ms>", "ms a client has to send a whole request before it is answered 408 (default: 60000)", intArg("--request-timeout"))
    .option("--max-context <n>", "context length in tokens (default: the model's, or what the K/V pool holds)", intArg("--max-context")),
)
  .addOption(deviceOption())
  .addOption(dtypeOption())
  .addOption(kvDtypeOption())
  .addOption(kvMemoryOption())
  .action(async (o) => {
    // A hub id names the model; a directory, its name (createServer's default). The options are
    // checked before the model loads, so that a bad one (an empty --api-key) fails first.
    const options = checkServerOptions({
      apiKey: o.apiKey,
      modelId: o.model !== undefined && !fs.existsSync(o.model) ? o.model : undefined,
      allowedOrigins: o.allowedOrigins === undefined ? undefined : (o.allowedOrigins as string).split(",").map((x) => x.trim()).filter((x) => x !== ""),
      writeStallTimeout: o.writeStallTimeout,
      requestTimeout: o.requestTimeout,
      prefill: o.prefill,
      prefillPasses: o.prefillPasses,
      prefillTolerance: o.prefillTolerance,
    });
    await using model = await open(o);
    const app = createServer(model, options);
    let url: string;
    try {
      url = await app.listen({ host: o.host, port: o.port });
    } catch (e) {
      // A port in use or not permitted, an address not of this host: the user's to change, so
      // one line naming it rather than a stack.
      const code = (e as NodeJS.ErrnoException).code;
      if (typeof code !== "string" || !/^E[A-Z]+$/.test(code)) throw e;
      process.stderr.write(`lckv: cannot listen on ${o.host}:${o.port} (--host, --port): ${(e as Error).message}\n`);
      process.exitCode = 1;
      return;
    }
    process.stderr.write(`lckv: listening on ${url}\n`);
    // SIGTERM or SIGINT: take no more requests, finish those in flight, then exit.
    await new Promise<void>((resolve) => {
      process.once("SIGTERM", resolve);
      process.once("SIGINT", resolve);
    });
    process.stderr.write("lckv: stopping: finishing the requests in flight\n");
    await app.close();
  });

// Each layer's sliding window, said once for the layers that share it: "none", "4096 tokens on
// every layer", or "4096 tokens on layers 0, 2; none on layers 1, 3".
function windowsText(windows: number[]): string {
  const byWindow = new Map<number, number[]>();
  windows.forEach((w, i) => byWindow.set(w, [...(byWindow.get(w) ?? []), i]));
  if (byWindow.size === 1) return windows[0] === 0 ? "none" : `${windows[0]} tokens on every layer`;
  return [...byWindow].map(([w, layers]) => `${w === 0 ? "none" : `${w} tokens`} on layers ${layers.join(", ")}`).join("; ");
}

// Library options whose flag is spelled otherwise.
const FLAG_OF_OPTION: Record<string, string> = { calibrationTokens: "--calib-tokens", kvCacheDtype: "--kv-dtype" };

// An option the library refused by its API name (maxNewTokens), said as the flag the user typed
// (--max-new-tokens) where a command has one of that name.
function cliMessage(e: LckvError): string {
  if (!(e instanceof InvalidOptionError)) return e.message;
  const flag = FLAG_OF_OPTION[e.option] ?? program.commands.flatMap((c) => c.options).find((o) => o.long && o.attributeName() === e.option)?.long;
  return flag ? `option '${flag}': ${e.detail}` : e.message;
}

program.parseAsync(process.argv).catch((e: unknown) => {
  if (e instanceof LckvError) {
    process.stderr.write(`lckv: ${cliMessage(e)}\n`);
    process.exitCode = 1;
  } else {
    process.stderr.write(`lckv: ${(e as Error)?.stack ?? String(e)}\n`);
    process.exitCode = 2;
  }
});
