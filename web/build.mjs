// Bundle the page into OUT_DIR (`npm run build` writes ../server/static, which is committed):
// app.js from src/main.ts with everything it imports, plus index.html and style.css.
// The output depends only on the sources and the locked packages, so a test can rebuild it
// into a temporary folder and compare.
import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const out = process.argv[2];
if (!out) {
  console.error("usage: node build.mjs OUT_DIR");
  process.exit(2);
}
const here = dirname(fileURLToPath(import.meta.url));
await rm(out, { recursive: true, force: true });
await mkdir(out, { recursive: true });
await build({
  entryPoints: [resolve(here, "src/main.ts")],
  outfile: resolve(out, "app.js"),
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "none",
  logLevel: "warning",
});
for (const file of ["index.html", "style.css"]) {
  await copyFile(resolve(here, file), resolve(out, file));
}
