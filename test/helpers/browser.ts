// Opens a page in headless Chromium (Debian's package) and reads the screenshot back:
// a small PNG decoder (8-bit RGB/RGBA, non-interlaced, as Chromium writes) and a
// colour count, so tests can check that a report really renders.
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { promisify } from "node:util";
import { inflateSync } from "node:zlib";

const run = promisify(execFile);

export async function screenshot(htmlFile: string, pngFile: string, width = 1280, height = 2000): Promise<void> {
  await run(
    "chromium",
    ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-dev-shm-usage", `--window-size=${width},${height}`, `--screenshot=${pngFile}`, `file://${htmlFile}`],
    { timeout: 60_000, env: { ...process.env, HOME: "/tmp" } },
  );
}

export interface Image {
  readonly width: number;
  readonly height: number;
  /** RGBA, row after row. */
  readonly data: Buffer;
}

export function decodePng(buf: Buffer): Image {
  if (buf.readUInt32BE(0) !== 0x89504e47) throw new Error("not a PNG");
  let off = 8;
  let width = 0;
  let height = 0;
  let colorType = 0;
  const idat: Buffer[] = [];
  while (off < buf.length) {
    const len = buf.readUInt32BE(off);
    const type = buf.toString("latin1", off + 4, off + 8);
    const body = buf.subarray(off + 8, off + 8 + len);
    if (type === "IHDR") {
      width = body.readUInt32BE(0);
      height = body.readUInt32BE(4);
      if (body[8] !== 8 || body[12] !== 0) throw new Error("only 8-bit non-interlaced PNGs");
      colorType = body[9]!;
    } else if (type === "IDAT") idat.push(body);
    else if (type === "IEND") break;
    off += 12 + len;
  }
  const bpp = colorType === 6 ? 4 : colorType === 2 ? 3 : 0;
  if (!bpp) throw new Error(`PNG colour type ${colorType} not supported`);
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * bpp;
  const out = Buffer.alloc(width * height * 4);
  let prev = Buffer.alloc(stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)]!;
    const line = Buffer.from(raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1)));
    for (let i = 0; i < stride; i++) {
      const a = i >= bpp ? line[i - bpp]! : 0;
      const b = prev[i]!;
      const c = i >= bpp ? prev[i - bpp]! : 0;
      let add = 0;
      if (filter === 1) add = a;
      else if (filter === 2) add = b;
      else if (filter === 3) add = (a + b) >> 1;
      else if (filter === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a);
        const pb = Math.abs(p - b);
        const pc = Math.abs(p - c);
        add = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      line[i] = (line[i]! + add) & 0xff;
    }
    for (let x = 0; x < width; x++) {
      out[(y * width + x) * 4] = line[x * bpp]!;
      out[(y * width + x) * 4 + 1] = line[x * bpp + 1]!;
      out[(y * width + x) * 4 + 2] = line[x * bpp + 2]!;
      out[(y * width + x) * 4 + 3] = bpp === 4 ? line[x * bpp + 3]! : 255;
    }
    prev = line;
  }
  return { width, height, data: out };
}

export function readPng(file: string): Image {
  return decodePng(readFileSync(file));
}

/** Pixels within TOLERANCE (per channel) of the colour "#rrggbb". */
export function countColor(img: Image, hex: string, tolerance = 3): number {
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)) as [number, number, number];
  let n = 0;
  for (let i = 0; i < img.data.length; i += 4) {
    if (Math.abs(img.data[i]! - r) <= tolerance && Math.abs(img.data[i + 1]! - g) <= tolerance && Math.abs(img.data[i + 2]! - b) <= tolerance) n++;
  }
  return n;
}
