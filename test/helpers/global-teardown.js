// Removes this run's temporary model directories (jest may end its workers before their own
// exit handlers run).
const fs = require("node:fs");

module.exports = async () => {
  if (process.env.LCKV_TEST_TMP) fs.rmSync(process.env.LCKV_TEST_TMP, { recursive: true, force: true });
};
