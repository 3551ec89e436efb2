// Two corrections to smtp-server, applied to its connection class as greeting.ts does
// (each only when the library's source still shows what it corrects; otherwise the
// library is left alone and the caller says so):
// - AUTH is advertised in EHLO only where it can succeed: not before STARTTLS on a port
//   that refuses AUTH in the clear (538), so clients do not send the password in clear
//   first (Postfix's smtpd_tls_auth_only).
// - A quoted local part (RCPT TO:<"x y"@example.org>, RFC 5321 4.1.2) is valid syntax:
//   the library split it at the space and answered 501. It is parsed here and handed on
//   quoted (or unquoted when its content is a plain dot-atom, "bob" being bob), so the
//   recipient check answers it like any other address (550 5.1.1 for nobody here).
import { SMTPConnection } from "smtp-server/lib/smtp-connection.js";

interface Conn {
  secure: boolean;
  _server: { options: { authMethods: string[]; hideSTARTTLS?: boolean; allowInsecureAuth?: boolean } };
  _isSupported(command: string): boolean;
}
type Parsed = { address: string; args: unknown } | false;
interface Proto {
  handler_EHLO: (this: Conn, command: Buffer | string, callback: () => void) => void;
  handler_AUTH: (this: Conn, command: Buffer | string, callback: () => void) => void;
  _parseAddressCommand: (this: Conn, name: string, command: Buffer | string) => Parsed;
}

// "RCPT TO:" (or "MAIL FROM:"), <"quoted"@domain>, the parameters. The quoted part: text
// and quoted pairs of printable ASCII, no angle brackets (it goes into trace fields).
const QUOTED = /^([^:<"]*:[ \t]*)<"((?:[\x20\x21\x23-\x3b\x3d\x3f-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"@([^<>"\s]+)>(.*)$/s;
const DOT_ATOM = /^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$/;
const PATH_MAX = 253; // as the library: local part, "@" and domain

export function applyConformance(): { authOnlyWhereAllowed: boolean; quotedLocalParts: boolean } {
  const proto = (SMTPConnection as unknown as { prototype: Proto }).prototype;
  const result = { authOnlyWhereAllowed: false, quotedLocalParts: false };
  const ehlo = proto.handler_EHLO;
  if (ehlo && !(ehlo as { mailha?: true }).mailha && /this\._server\.options\.authMethods\.length/.test(ehlo.toString()) && /!this\.secure && this\._isSupported\('STARTTLS'\) && !this\._server\.options\.hideSTARTTLS && !this\._server\.options\.allowInsecureAuth/.test(proto.handler_AUTH.toString())) {
    const patched = function (this: Conn, command: Buffer | string, callback: () => void) {
      const o = this._server.options;
      // handler_AUTH's own condition for its 538 "Must issue a STARTTLS command first".
      const refused = !this.secure && this._isSupported("STARTTLS") && !o.hideSTARTTLS && !o.allowInsecureAuth;
      if (!refused || !o.authMethods.length) return ehlo.call(this, command, callback);
      // EHLO builds its reply synchronously: the methods are back before anything else runs.
      const methods = o.authMethods;
      o.authMethods = [];
      try {
        return ehlo.call(this, command, callback);
      } finally {
        o.authMethods = methods;
      }
    };
    proto.handler_EHLO = Object.assign(patched, { mailha: true as const });
    result.authOnlyWhereAllowed = true;
  } else if ((ehlo as { mailha?: true } | undefined)?.mailha) result.authOnlyWhereAllowed = true;

  const parse = proto._parseAddressCommand;
  if (parse && (parse as { mailha?: true }).mailha) result.quotedLocalParts = true;
  else if (parse && /if \(!\/\^<\[\^<>\]\*>\$\/\.test\(address\)\)/.test(parse.toString())) {
    const patched = function (this: Conn, name: string, command: Buffer | string): Parsed {
      const m = QUOTED.exec((command ?? "").toString());
      if (!m) return parse.call(this, name, command);
      const content = m[2]!;
      const unquoted = content.replace(/\\(.)/g, "$1");
      const local = DOT_ATOM.test(unquoted) ? unquoted : `"${content}"`;
      if (local.length + 1 + m[3]!.length > PATH_MAX) return false;
      // The library checks the rest (domain, parameters) with a stand-in local part.
      const parsed = parse.call(this, name, `${m[1]}<q@${m[3]}>${m[4]}`);
      if (!parsed) return parsed;
      parsed.address = local + parsed.address.slice(1);
      return parsed;
    };
    proto._parseAddressCommand = Object.assign(patched, { mailha: true as const });
    result.quotedLocalParts = true;
  }
  return result;
}
