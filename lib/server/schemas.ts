/**
 * The JSON schemas fastify checks request bodies against, and the body types they describe.
 * Every object is closed (additionalProperties: false), so that a parameter the server does not
 * implement is refused by name instead of being silently ignored. Nullable fields take null, as
 * OpenAI's API does: clients send `"stop": null` and the like for "unset".
 */
import { F32_MIN_NORMAL, INT32_MAX } from "../options";

const nullable = (schema: Record<string, unknown>) => ({ ...schema, type: [schema.type as string, "null"] });

/** Fields /v1/chat/completions and /v1/completions share. */
const common = {
  model: { type: "string" },
  user: { type: "string" },
  stream: nullable({ type: "boolean" }),
  stream_options: nullable({
    type: "object",
    properties: { include_usage: { type: "boolean" } },
    additionalProperties: false,
  }),
  n: nullable({ type: "integer", minimum: 1, maximum: 64 }),
  max_tokens: nullable({ type: "integer", minimum: 0 }),
  temperature: nullable({ type: "number", minimum: 0, maximum: 2 }),
  // (0, 1], lckv's range for topP, checked here so that every bound is refused in one shape.
  top_p: nullable({ type: "number", exclusiveMinimum: 0, maximum: 1 }),
  seed: nullable({ type: "integer" }),
  stop: {
    type: ["string", "array", "null"],
    items: { type: "string", minLength: 1 },
    maxItems: 4,
    minLength: 1,
  },
  presence_penalty: nullable({ type: "number", minimum: -2, maximum: 2 }),
  frequency_penalty: nullable({ type: "number", minimum: -2, maximum: 2 }),
  // Token ids (as JSON's string keys) to a bias added to their logits. At most 10 digits (an id
  // is an int32): a longer key would reach lckv as a rounded number, and be named as that.
  logit_bias: nullable({
    type: "object",
    patternProperties: { "^[0-9]{1,10}$": { type: "number", minimum: -100, maximum: 100 } },
    additionalProperties: false,
  }),
  // vLLM's and llama.cpp's sampling fields beyond OpenAI's, in the ranges of lckv's options
  // (topK, minP, repetitionPenalty, ignoreEos), so that a bad value is refused here by name.
  // top_k -1 is vLLM's "all tokens", as 0 is lckv's; repetition_penalty is applied in f32 and
  // must stay within its normal range.
  top_k: nullable({ type: "integer", minimum: -1, maximum: INT32_MAX }),
  min_p: nullable({ type: "number", minimum: 0, maximum: 1 }),
  repetition_penalty: nullable({ type: "number", minimum: F32_MIN_NORMAL, maximum: 1 / F32_MIN_NORMAL }),
  ignore_eos: nullable({ type: "boolean" }),
} as const;

// The part's type is checked first (ajv checks required and additionalProperties before
// properties), so that an image part is refused for its type, not for a missing 'text'.
const contentPart = {
  type: "object",
  allOf: [{ properties: { type: { const: "text" } }, required: ["type"] }],
  properties: { type: {}, text: { type: "string" } },
  required: ["text"],
  additionalProperties: false,
};

const message = {
  type: "object",
  properties: {
    role: { enum: ["system", "developer", "user", "assistant"] },
    // null only in an assistant's message (the handler checks the role), as OpenAI allows.
    content: { type: ["string", "array", "null"], items: contentPart },
    name: { type: "string" },
  },
  required: ["role", "content"],
  additionalProperties: false,
};

export const chatCompletionBody = {
  type: "object",
  properties: {
    ...common,
    messages: { type: "array", items: message, minItems: 1 },
    max_completion_tokens: nullable({ type: "integer", minimum: 0 }),
    logprobs: nullable({ type: "boolean" }),
    top_logprobs: nullable({ type: "integer", minimum: 0, maximum: 20 }),
    // Plain text is what the server writes; other formats are refused by name.
    response_format: {
      type: "object",
      properties: { type: { const: "text" } },
      required: ["type"],
      additionalProperties: false,
    },
  },
  required: ["messages"],
  additionalProperties: false,
} as const;

export const completionBody = {
  type: "object",
  properties: {
    ...common,
    // Text or token ids; or a list of prompts, each text or token ids (one completion each,
    // times n). The handler refuses a list that mixes token ids with prompts.
    prompt: {
      type: ["string", "array"],
      minLength: 1,
      minItems: 1,
      items: { type: ["integer", "string", "array"], minLength: 1, minItems: 1, items: { type: "integer" } },
    },
    logprobs: nullable({ type: "integer", minimum: 0, maximum: 20 }),
  },
  required: ["prompt"],
  additionalProperties: false,
} as const;

/** The fields both endpoints share, as the handlers read them (after validation). */
export interface CommonBody {
  model?: string;
  user?: string;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean } | null;
  n?: number | null;
  max_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  seed?: number | null;
  stop?: string | string[] | null;
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  logit_bias?: Record<string, number> | null;
  top_k?: number | null;
  min_p?: number | null;
  repetition_penalty?: number | null;
  ignore_eos?: boolean | null;
}

export interface ChatMessageBody {
  role: "system" | "developer" | "user" | "assistant";
  content: string | { type: "text"; text: string }[] | null;
  name?: string;
}

export interface ChatCompletionBody extends CommonBody {
  messages: ChatMessageBody[];
  max_completion_tokens?: number | null;
  logprobs?: boolean | null;
  top_logprobs?: number | null;
  response_format?: { type: "text" };
}

export interface CompletionBody extends CommonBody {
  prompt: string | number[] | (string | number[])[];
  logprobs?: number | null;
}
