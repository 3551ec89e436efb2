// Envelope addresses in the form mailha keeps them: smtp-server hands a domain over in
// Unicode even when the client sent its ASCII (ACE, "xn--") form, while mail.domains,
// the accounts, the Maildir paths, DNS and the next SMTP hop all use the ACE form. An
// address's domain is turned back into ACE before it is looked up or passed on; the
// local part is left as it is.
import { domainToASCII } from "node:url";

const ASCII = /^[\x00-\x7f]*$/;

/** ADDRESS with its domain in ACE form; unchanged when already ASCII or not a valid name. */
export function aceAddress(address: string): string {
  const at = address.lastIndexOf("@");
  if (at < 0) return address;
  const domain = address.slice(at + 1);
  if (ASCII.test(domain)) return address;
  const ace = domainToASCII(domain);
  return ace ? `${address.slice(0, at)}@${ace}` : address;
}
