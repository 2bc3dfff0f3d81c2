// Times js/pixel_warp.js (the editor's live warp preview) under Node and prints medians:
//   node benchmarks/js_warp.mjs [runs] [path/to/other/pixel_warp.js]
// Cases: a disc-shaped region (20,069 px at 512 x 512, 80,369 px at 512 x 768) dragged by (44, 20)
// with one handle, band 5. With a second module (e.g. an older pixel_warp.js copied elsewhere),
// both are timed interleaved, so load from other processes hits both alike.
import { pathToFileURL } from "node:url";
import { pixelWarp } from "../js/pixel_warp.js";

const runs = Number(process.argv[2] || 15);
const modules = [["js/pixel_warp.js", pixelWarp]];
if (process.argv[3]) modules.push([process.argv[3], (await import(pathToFileURL(process.argv[3]).href)).pixelWarp]);

/** The benchmark input: a width x height gradient with a disc of radius r in the mask. */
function input(width, height, r) {
  const rgba = new Uint8ClampedArray(width * height * 4).map((_, i) => (i * 37) % 251);
  const mask = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) if ((x - 256) ** 2 + (y - height / 2) ** 2 < r * r) mask[y * width + x] = 1;
  }
  return { width, height, rgba, mask, handles: [[256, height / 2]], targets: [[300, height / 2 + 20]], band: 5 };
}

for (const [width, height, r] of [[512, 512, 80], [512, 768, 160]]) {
  const args = input(width, height, r);
  const times = modules.map(() => []);
  for (let i = 0; i < runs + 2; i++) {
    modules.forEach(([, warp], m) => {
      const t = performance.now();
      warp(args);
      if (i >= 2) times[m].push(performance.now() - t); // two warm-up runs
    });
  }
  const region = args.mask.reduce((a, b) => a + b, 0);
  modules.forEach(([name], m) => {
    const sorted = times[m].sort((a, b) => a - b);
    console.log(`${width}x${height} region ${region} px, ${name}: median ${sorted[sorted.length >> 1].toFixed(1)} ms` +
                ` (min ${sorted[0].toFixed(1)}, ${runs} runs)`);
  });
}
