#!/usr/bin/env node
/**
 * The lckv command line:
 *   lckv generate [prompt] [--model dir] [--max-new-tokens N] [--temperature T] [--device cpu|cuda] [--seed S]
 *   lckv info [--model dir]
 *   lckv eval-ppl --text file [--model dir] [--window N] [--prefill mode]
 */
import { Command, InvalidArgumentError, Option } from "commander";
import { SingleBar } from "cli-progress";
import { formatLayerTypes } from "./plan";
import { LckvError } from "./errors";
import { loadModel, LoadOptions } from "./load-model";
import { Model } from "./model";
import { evaluatePerplexity } from "./eval";
import * as fs from "node:fs";

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

async function open(opts: { model?: string; device?: "auto" | "cpu" | "cuda"; maxContext?: number }): Promise<Model> {
  const load: LoadOptions = { device: opts.device ?? "auto" };
  if (opts.maxContext !== undefined) load.maxContext = opts.maxContext;
  if (process.stderr.isTTY) {
    const bar = new SingleBar({ format: "loading {bar} {percentage}%", stream: process.stderr, clearOnComplete: true, hideCursor: true });
    bar.start(100, 0);
    load.onProgress = (f) => bar.update(Math.round(f * 100));
    try {
      return await loadModel(opts.model, load);
    } finally {
      bar.stop();
    }
  }
  return loadModel(opts.model, load);
}

function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

const program = new Command();
program.name("lckv").description("Run language models with layer-condensed KV caches").showHelpAfterError();

// Options several commands share.
const deviceOption = () => new Option("--device <device>", "where to run").choices(["auto", "cpu", "cuda"]).default("auto");
const modelOption = () => new Option("-m, --model <dir>", "Hugging Face model directory (default: the embedded model)");
const prefillOption = () => new Option("--prefill <mode>", "LCKV prompt prefill").choices(["fixed-point", "sequential", "iterative"]);

program
  .command("generate")
  .description("stream a completion of the prompt to stdout")
  .argument("[prompt]", "text to continue (default: read stdin when it is not a terminal)")
  .addOption(modelOption())
  .option("-n, --max-new-tokens <n>", "tokens to generate", intArg("--max-new-tokens"))
  .option("-t, --temperature <t>", "sampling temperature (0 = greedy)", numArg("--temperature"))
  .option("--top-k <k>", "keep the k most likely tokens", intArg("--top-k"))
  .option("--top-p <p>", "nucleus sampling mass", numArg("--top-p"))
  .option("--min-p <p>", "drop tokens below p times the most likely", numArg("--min-p"))
  .option("--repetition-penalty <r>", "penalise tokens already in the text", numArg("--repetition-penalty"))
  .option("-s, --seed <s>", "random seed for reproducible sampling", intArg("--seed"))
  .option("--max-context <n>", "context length in tokens", intArg("--max-context"))
  .addOption(prefillOption())
  .addOption(deviceOption())
  .action(async (prompt: string | undefined, o) => {
    if (prompt === undefined && !process.stdin.isTTY) {
      const chunks: Buffer[] = [];
      for await (const c of process.stdin) chunks.push(c as Buffer);
      prompt = Buffer.concat(chunks).toString("utf8");
    }
    const model = await open(o);
    try {
      const text = prompt ?? "";
      process.stdout.write(text);
      const it = model.stream(text, {
        maxNewTokens: o.maxNewTokens,
        temperature: o.temperature,
        topK: o.topK,
        topP: o.topP,
        minP: o.minP,
        repetitionPenalty: o.repetitionPenalty,
        seed: o.seed,
        prefill: o.prefill,
      });
      for (;;) {
        const r = await it.next();
        if (r.done || stdoutClosed) break;
        process.stdout.write(r.value.text);
      }
      if (stdoutClosed) await it.return(undefined as never);  // ends the request: its pages go back
      else process.stdout.write("\n");
    } finally {
      await model.dispose();
    }
  });

program
  .command("info")
  .description("print the architecture, layer pattern and KV cache cost of a model")
  .addOption(modelOption())
  .option("--json", "print JSON")
  .addOption(deviceOption())
  .action(async (o) => {
    const model = await open(o);
    try {
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
        kvBytesPerToken: model.kvBytesPerToken,
        standardKvBytesPerToken: model.standardKvBytesPerToken,
        kvReduction: model.standardKvBytesPerToken / model.kvBytesPerToken,
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
        ["KV bytes/token", `${formatBytes(info.kvBytesPerToken)} (standard cache: ${formatBytes(info.standardKvBytesPerToken)}, ${info.kvReduction.toFixed(2)}x less)`],
        ["max context", `${info.maxContext} tokens`],
      ];
      const w = Math.max(...rows.map((r) => r[0].length));
      for (const [k, v] of rows) process.stdout.write(`${k.padEnd(w)}  ${v}\n`);
    } finally {
      await model.dispose();
    }
  });

program
  .command("eval-ppl")
  .description("perplexity of a text file, in non-overlapping windows (see lib/eval.ts)")
  .requiredOption("--text <file>", "UTF-8 text to score")
  .addOption(modelOption())
  .option("--window <n>", "tokens per window (default: the model's context)", posIntArg("--window"))
  .option("--max-tokens <n>", "score only the first n tokens", posIntArg("--max-tokens"))
  .option("--json", "print JSON")
  .addOption(prefillOption())
  .option("--prefill-passes <n>", "passes for --prefill iterative", intArg("--prefill-passes"))
  .addOption(deviceOption())
  .action(async (o) => {
    let text: string;
    try {
      text = fs.readFileSync(o.text, "utf8");
    } catch (e) {
      throw new LckvError("LCKV_IO", `cannot read --text ${o.text}: ${(e as Error).message}`);
    }
    const model = await open(o);
    try {
      if (!model.tokenizer) throw new LckvError("LCKV_NO_TOKENIZER", `${model.directory} has no tokenizer.json`);
      let ids = model.tokenizer.encode(text, { addSpecialTokens: false });
      if (o.maxTokens !== undefined) ids = ids.slice(0, o.maxTokens);
      const r = await evaluatePerplexity(model, ids, { window: o.window, prefill: o.prefill, prefillPasses: o.prefillPasses });
      const sorted = [...r.passes].sort((a, b) => a - b);
      const summary = {
        model: model.directory,
        text: o.text,
        tokens: ids.length,
        window: o.window ?? model.maxContext,
        prefill: o.prefill ?? "fixed-point",
        perplexity: r.perplexity,
        meanNll: r.meanNll,
        predictedTokens: r.predictedTokens,
        windows: r.windows,
        passesMedian: sorted.length ? sorted[Math.floor((sorted.length - 1) / 2)] : 0,
        passesMax: sorted.length ? sorted[sorted.length - 1] : 0,
      };
      if (o.json) process.stdout.write(JSON.stringify(summary, null, 2) + "\n");
      else process.stdout.write(`perplexity ${r.perplexity.toFixed(4)} over ${r.predictedTokens} predicted tokens in ${r.windows} windows\n`);
    } finally {
      await model.dispose();
    }
  });

program.parseAsync(process.argv).catch((e: unknown) => {
  if (e instanceof LckvError) {
    process.stderr.write(`lckv: ${e.message}\n`);
    process.exitCode = 1;
  } else {
    process.stderr.write(`lckv: ${(e as Error)?.stack ?? String(e)}\n`);
    process.exitCode = 2;
  }
});
