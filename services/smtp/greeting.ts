// smtp-server holds every new connection for 100 ms before its greeting (to catch
// clients that talk too soon). mailha greets at once, as Postfix's smtpd does: the
// pause costs a tenth of a second per message for senders that open a connection per
// message. Applied by replacing SMTPConnection.init when its source shows the pause;
// otherwise (a changed library) it leaves the library alone and says so.
import { SMTPConnection } from "smtp-server/lib/smtp-connection.js";

interface Conn {
  _server: { options: { maxClients?: number }; connections: Set<unknown> };
  name: string;
  _setListeners(cb: () => void): void;
  send(code: number, text: string, close?: boolean): void;
  connectionReady(): void;
}

export function greetWithoutPause(): boolean {
  const proto = (SMTPConnection as { prototype: { init: (this: Conn) => void } }).prototype;
  if (!proto?.init || !/setTimeout\(\(\) => this\.connectionReady\(\), 100\)/.test(proto.init.toString())) return false;
  proto.init = function init(this: Conn) {
    this._setListeners(() => {
      if (this._server.options.maxClients && this._server.connections.size > this._server.options.maxClients) {
        return this.send(421, `${this.name} Too many connected clients, try again in a moment`, false);
      }
      this.connectionReady();
    });
  };
  return true;
}
