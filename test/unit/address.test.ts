// Envelope addresses back in ACE form: smtp-server gives domains in Unicode, mailha
// keeps (and looks up) the ASCII form.
import { test } from "node:test";
import assert from "node:assert/strict";
import { aceAddress, recipientAddress } from "../../services/smtp/address.ts";

test("a Unicode domain becomes its ACE form; the local part stays", () => {
  assert.equal(aceAddress("dora@bücher.test"), "dora@xn--bcher-kva.test");
  assert.equal(aceAddress("Dora.X@BÜCHER.test"), "Dora.X@xn--bcher-kva.test");
  assert.equal(aceAddress("a@münchen.example.org"), "a@xn--mnchen-3ya.example.org");
});

test("ASCII addresses, addresses without a domain and invalid names are left alone", () => {
  assert.equal(aceAddress("bob@mailha.test"), "bob@mailha.test");
  assert.equal(aceAddress("dora@xn--bcher-kva.test"), "dora@xn--bcher-kva.test");
  assert.equal(aceAddress("postmaster"), "postmaster");
  assert.equal(aceAddress(""), "");
  assert.equal(aceAddress("x@bü cher.test"), "x@bü cher.test");
});

test("RCPT TO:<postmaster> without a domain is the first local domain's postmaster", () => {
  assert.equal(recipientAddress("postmaster", "mailha.test"), "postmaster@mailha.test");
  assert.equal(recipientAddress("PostMaster", "mailha.test"), "postmaster@mailha.test");
  assert.equal(recipientAddress("postmaster@bücher.test", "mailha.test"), "postmaster@xn--bcher-kva.test");
  assert.equal(recipientAddress("bob@mailha.test", "mailha.test"), "bob@mailha.test");
});
