/**
 * Reading a model directory's small files: whether one is there, and its JSON, each failure a
 * ModelLoadError naming the file.
 */
import * as fs from "node:fs";
import { ConfigError, ModelLoadError } from "./errors";

/** A model file's text (UTF-8); a file that cannot be read is a ModelLoadError naming it. */
export function readModelText(file: string): string {
  try {
    return fs.readFileSync(file, "utf8");
  } catch (e) {
    throw new ModelLoadError(`cannot read ${file}: ${(e as Error).message}`, file, "LCKV_MODEL_LOAD", { cause: e });
  }
}

/**
 * Whether a model directory's file is there. A symbolic link that leads nowhere (to a blob a
 * download never finished, or in a loop) is an error naming it, not an absent file: taken for
 * absent, the model would load without it (its tokenizer, its generation defaults) or be said to
 * lack a file that is plainly listed.
 */
export function modelFileExists(file: string): boolean {
  if (fs.existsSync(file)) return true;
  let link: fs.Stats;
  try {
    link = fs.lstatSync(file);
  } catch {
    return false;
  }
  if (!link.isSymbolicLink()) return false;
  let why = "it leads nowhere";
  try {
    fs.statSync(file);
  } catch (e) {
    why = (e as Error).message;
  }
  throw new ModelLoadError(`${file} is a symbolic link that leads nowhere (${why})`, file);
}

export function readJson(file: string): unknown {
  const text = readModelText(file);
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ModelLoadError(`${file}: not valid JSON (${(e as Error).message})`, file);
  }
}

/** A model file that must hold a JSON object (tokenizer_config.json and its kin), as that object. */
export function readJsonObject(file: string): Record<string, unknown> {
  const v = readJson(file);
  if (typeof v !== "object" || v === null || Array.isArray(v)) throw new ConfigError(file, "(root)", "must be a JSON object");
  return v as Record<string, unknown>;
}
