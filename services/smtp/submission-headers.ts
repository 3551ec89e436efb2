// Submission (587, 465): a message without a Date: or Message-ID: field gets one, as a
// message submission agent does (RFC 6409, 8.3 and 8.4; RFC 5322 requires Date:, and
// mail without it is marked down by spam filters). Mail that arrives on 25 is passed on
// as it came. The fields go above the message's own header (or before the blank line
// of an empty one). A message whose first line is not a header field (an mbox "From "
// line, a body without header) and a header larger than SCAN_MAX_BYTES are passed on
// unchanged: nothing is moved or held in memory. The result's `addedBytes` says how
// many bytes were added, so that size limits count only the client's.
import { pipeline, Transform, type Readable, type TransformCallback } from "node:stream";

export const SCAN_MAX_BYTES = 64 * 1024;

export interface AddedFields {
  /** RFC 5322 date-time of now. */
  date(): string;
  /** A new msg-id, with its angle brackets. */
  messageId(): string;
}

const HEADER_FIELD = /^[\x21-\x39\x3b-\x7e]+:/;

/** The fields the header (text up to the blank line) lacks, as lines ending in CRLF. */
export function missingFields(header: string, add: AddedFields): string {
  let date = false;
  let id = false;
  for (const line of header.split("\r\n")) {
    const name = line.slice(0, line.indexOf(":")).toLowerCase();
    if (name === "date") date = true;
    else if (name === "message-id") id = true;
  }
  return (date ? "" : `Date: ${add.date()}\r\n`) + (id ? "" : `Message-ID: ${add.messageId()}\r\n`);
}

/**
 * SOURCE with the missing fields added. The result carries the source's `sizeExceeded`
 * flag (smtp-server's) once the source has ended, and ends with its error if it fails.
 */
export function completeHeaders(source: Readable, add: AddedFields): Readable {
  let held: Buffer = Buffer.alloc(0);
  let decided = false;
  const out = new Transform({
    transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
      if (decided) return cb(null, chunk);
      held = held.length ? Buffer.concat([held, chunk]) : chunk;
      if (held.length >= 2 && held[0] === 0x0d && held[1] === 0x0a) release(this, ""); // an empty header
      else {
        // Decided by the first SCAN_MAX_BYTES alone, however the message is cut in chunks.
        const end = held.indexOf("\r\n\r\n");
        if (end >= 0 && end <= SCAN_MAX_BYTES) release(this, held.subarray(0, end).toString("latin1"));
        else if (end > SCAN_MAX_BYTES || held.length > SCAN_MAX_BYTES + 3) release(this, null);
      }
      cb();
    },
    flush(cb: TransformCallback) {
      // No blank line: the whole message is header (or body only, or empty).
      if (!decided) release(this, held.length <= SCAN_MAX_BYTES + 2 ? held.toString("latin1").replace(/\r\n$/, "") : null);
      cb();
    },
  });
  /** HEADER: the message's header text, "" when empty, null when too long to scan. */
  function release(t: Transform, header: string | null): void {
    decided = true;
    if (header !== null && (header === "" || HEADER_FIELD.test(header))) {
      const fields = missingFields(header, add);
      if (fields) {
        t.push(Buffer.from(fields, "latin1"));
        (out as Readable & { addedBytes?: number }).addedBytes = fields.length;
      }
    }
    if (held.length) t.push(held);
    held = Buffer.alloc(0);
  }
  source.once("end", () => {
    (out as Readable & { sizeExceeded?: boolean }).sizeExceeded = (source as Readable & { sizeExceeded?: boolean }).sizeExceeded;
  });
  pipeline(source, out, () => {
    // pipeline destroys OUT with the source's error; nothing more to do here.
  });
  return out;
}
