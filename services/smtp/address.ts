// Envelope addresses in the form mailha keeps them: smtp-server hands a domain over in
// Unicode even when the client sent its ASCII (ACE, "xn--") form, while mail.domains,
// the accounts, the Maildir paths, DNS and the next SMTP hop all use the ACE form. An
// address's domain is turned back into ACE before it is looked up or passed on; the
// local part is left as it is. A recipient "postmaster" without a domain (which every
// SMTP server must accept, RFC 5321 4.5.1) is the postmaster of the first local domain.
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

/** The recipient as mailha looks it up: domainless "postmaster" (any case) at FIRSTDOMAIN, any other in ACE form. */
export function recipientAddress(address: string, firstDomain: string): string {
  return address.toLowerCase() === "postmaster" ? `postmaster@${firstDomain}` : aceAddress(address);
}
