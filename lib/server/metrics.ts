/**
 * The server's Prometheus metrics (GET /metrics), in a registry of its own so that two servers in
 * one process, or an application's own prom-client registry, do not collide. The gauges read the
 * model's cache stats when scraped; the counter and histograms are fed by the generations.
 */
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { Model } from "../model";

export class ServerMetrics {
  readonly registry = new Registry();
  private readonly tokens: Counter;
  private readonly requests: Counter<"endpoint" | "status">;
  private readonly ttft: Histogram;
  private readonly itl: Histogram;

  constructor(model: Model) {
    const registers = [this.registry];
    // The gauges that read the model's cache stats when scraped.
    const fromStats: [string, string, "queued" | "pagesUsed" | "pagesCached" | "pagesTotal"][] = [
      ["lckv_queue_length", "Requests waiting for K/V pages", "queued"],
      ["lckv_kv_pages_used", "K/V cache pages in use (running requests and the prefix cache)", "pagesUsed"],
      ["lckv_kv_pages_cached", "K/V cache pages held only by finished requests kept for prefix reuse", "pagesCached"],
      ["lckv_kv_pages_total", "K/V cache pages in the pool", "pagesTotal"],
    ];
    for (const [name, help, key] of fromStats) {
      new Gauge({
        name,
        help,
        registers,
        collect() {
          this.set(model.cacheStats()[key]);
        },
      });
    }
    // As vLLM's num_requests_running beside num_requests_waiting: admitted, not waiting.
    new Gauge({
      name: "lckv_running_sequences",
      help: "Sequences prefilling or generating now (not those waiting for K/V pages: lckv_queue_length)",
      registers,
      collect() {
        this.set(model.cacheStats().running);
      },
    });
    new Gauge({
      name: "lckv_step_sequences_max",
      help: "The most sequences one decode step has run since the model was loaded (at most its maxBatch, lckv serve --max-batch)",
      registers,
      collect() {
        this.set(model.schedulerStats().maxBatch);
      },
    });
    this.tokens = new Counter({ name: "lckv_generated_tokens_total", help: "Tokens generated", registers });
    this.requests = new Counter({ name: "lckv_requests_total", help: "Completion requests that reached generation, by endpoint and HTTP status (499: the client went away)", labelNames: ["endpoint", "status"], registers });
    // Buckets from a fast GPU's milliseconds to a CPU's seconds.
    this.ttft = new Histogram({
      name: "lckv_time_to_first_token_seconds",
      help: "Time from a request's arrival to its first generated token",
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    });
    this.itl = new Histogram({
      name: "lckv_inter_token_latency_seconds",
      help: "Time between successive tokens of one completion",
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers,
    });
  }

  /** A token of a completion: `sinceMs` is the time since the request came, or since its last token. */
  token(first: boolean, sinceMs: number): void {
    this.tokens.inc();
    (first ? this.ttft : this.itl).observe(sinceMs / 1000);
  }

  request(endpoint: string, status: number): void {
    this.requests.inc({ endpoint, status: String(status) });
  }

  async text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
