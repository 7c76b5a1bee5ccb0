import fs from "node:fs";
import os from "node:os";
import path from "node:path";

/**
 * A new directory inside this jest run's temporary directory (test/helpers/global-setup.js), which
 * the global teardown removes: a test that fails half-way leaves nothing behind in the system's.
 */
export function testTempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(process.env.LCKV_TEST_TMP ?? os.tmpdir(), prefix));
}
