/**
 * A Hugging Face hub on 127.0.0.1 for the download tests: the endpoints @huggingface/hub calls
 * (model info, tree listing, resolve with Range support and the hub's headers), serving model
 * directories from test/fixtures. It records every request and can misbehave on demand: drop the
 * connection partway through a file, report a size that is not the file's, or ask for a token.
 */
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as http from "node:http";
import { AddressInfo } from "node:net";
import * as path from "node:path";

export interface HubRequest {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
}

interface RepoFile {
  bytes: Buffer;
  /** sha256 for the LFS-stored (.safetensors) files, the git blob id for the others: the hub's etags. */
  etag: string;
  lfs: boolean;
}

interface Repo {
  commit: string;
  files: Map<string, RepoFile>;
}

export class FakeHub {
  readonly requests: HubRequest[] = [];
  /** The next full GET of `file` sends `after` bytes, then the connection is dropped. */
  dropOnce?: { file: string; after: number };
  /** The next full GET of `file` sends `after` bytes, then nothing more, the connection kept open. */
  stallOnce?: { file: string; after: number };
  /** `file`'s size is reported `extra` bytes larger than it is, in the listing and the headers. */
  lieSize?: { file: string; extra: number };
  /** When set, every request must carry "Authorization: Bearer <token>" (else 401, as for a private repo). */
  token?: string;
  private readonly repos = new Map<string, Repo>();
  private readonly server = http.createServer((req, res) => this.handle(req, res));

  /** Serves the files of `dir` as the model `id` at its "main" branch. */
  addRepo(id: string, dir: string): Repo {
    const files = new Map<string, RepoFile>();
    for (const name of fs.readdirSync(dir)) {
      const bytes = fs.readFileSync(path.join(dir, name));
      const lfs = name.endsWith(".safetensors");
      const etag = lfs
        ? crypto.createHash("sha256").update(bytes).digest("hex")
        : crypto.createHash("sha1").update(`blob ${bytes.length}\0`).update(bytes).digest("hex");
      files.set(name, { bytes, etag, lfs });
    }
    const repo = { commit: crypto.createHash("sha1").update(id).digest("hex"), files };
    this.repos.set(id, repo);
    return repo;
  }

  async listen(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  private reportedSize(name: string, f: RepoFile): number {
    return f.bytes.length + (this.lieSize?.file === name ? this.lieSize.extra : 0);
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.requests.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers });
    const url = new URL(req.url ?? "/", "http://127.0.0.1");
    const notFound = (code: string) => {
      res.writeHead(404, { "content-type": "application/json", "x-error-code": code });
      res.end(JSON.stringify({ error: `${code}: ${url.pathname}` }));
    };
    if (this.token !== undefined && req.headers.authorization !== `Bearer ${this.token}`) {
      res.writeHead(401, { "content-type": "application/json", "x-error-code": "RepoNotFound" });
      res.end(JSON.stringify({ error: "Invalid credentials" }));
      return;
    }
    const api = /^\/api\/models\/([^/]+\/[^/]+)\/(revision|tree)\/([^/]+)$/.exec(url.pathname);
    const resolve = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    const id = api?.[1] ?? resolve?.[1];
    const repo = id === undefined ? undefined : this.repos.get(id);
    if (!repo) return notFound("RepoNotFound");
    const revision = decodeURIComponent((api?.[3] ?? resolve?.[2]) as string);
    if (revision !== "main" && revision !== repo.commit) return notFound("RevisionNotFound");

    if (api?.[2] === "revision") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({
        _id: id, id, sha: repo.commit, private: false, downloads: 0, likes: 0, lastModified: "2025-01-01T00:00:00.000Z",
        siblings: [...repo.files.keys()].map((rfilename) => ({ rfilename })),
      }));
      return;
    }
    if (api?.[2] === "tree") {
      const entries = [...repo.files].map(([name, f]) => ({
        type: "file",
        path: name,
        size: this.reportedSize(name, f),
        oid: f.lfs ? crypto.createHash("sha1").update(name).digest("hex") : f.etag,
        ...(f.lfs && { lfs: { oid: f.etag, size: this.reportedSize(name, f), pointerSize: 134 } }),
      }));
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(entries));
      return;
    }

    const name = decodeURIComponent(resolve![3]);
    const f = repo.files.get(name);
    if (!f) return notFound("EntryNotFound");
    const size = this.reportedSize(name, f);
    const headers: http.OutgoingHttpHeaders = {
      "content-type": "application/octet-stream",
      "accept-ranges": "bytes",
      "x-repo-commit": repo.commit,
      etag: `"${f.etag}"`,
      ...(f.lfs && { "x-linked-etag": `"${f.etag}"`, "x-linked-size": String(size) }),
    };
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? "");
    if (range) {
      const start = Number(range[1]);
      const end = range[2] === "" ? size - 1 : Math.min(Number(range[2]), size - 1);
      if (start >= size) {
        res.writeHead(416, { "content-range": `bytes */${size}` });
        res.end();
        return;
      }
      const body = f.bytes.subarray(start, end + 1);
      // A lying size still claims the whole range in Content-Range; the body is what there is.
      res.writeHead(206, { ...headers, "content-range": `bytes ${start}-${end}/${size}`, "content-length": body.length });
      if (start === 0 && end > 0 && this.drop(name, body, res)) return;
      res.end(req.method === "HEAD" ? undefined : body);
      return;
    }
    res.writeHead(200, { ...headers, "content-length": f.bytes.length });
    if (this.drop(name, f.bytes, res)) return;
    res.end(req.method === "HEAD" ? undefined : f.bytes);
  }

  private drop(name: string, body: Buffer, res: http.ServerResponse): boolean {
    if (this.stallOnce?.file === name) {
      res.write(body.subarray(0, this.stallOnce.after));
      this.stallOnce = undefined;
      return true;
    }
    if (this.dropOnce?.file !== name) return false;
    const after = this.dropOnce.after;
    this.dropOnce = undefined;
    res.write(body.subarray(0, after), () => res.socket?.destroy());
    return true;
  }
}
