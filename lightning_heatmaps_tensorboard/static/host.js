// TensorBoard's iframe protocol, the part the dashboard needs: the host broadcasts
// "experimental.DataReloaded" on every reload (the reload button and the auto-reload timer).
//
// The plugin frame posts "experimental.bootstrap" to its parent with one end of a MessageChannel; the host
// then talks over that port with JSON messages {type, id, payload, error, isReply}, and waits for a reply
// to each message it sends.

export function listenToHost(handlers) {
  if (!window.parent || window.parent === window) {
    return false;  // opened on its own, outside TensorBoard: the dashboard polls instead
  }
  const channel = new MessageChannel();
  const port = channel.port1;
  port.addEventListener("message", (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (error) {
      return;
    }
    if (!message || message.isReply) {
      return;
    }
    const handler = handlers[message.type];
    let error = null;
    try {
      if (handler) {
        handler(message.payload);
      }
    } catch (caught) {
      error = String(caught);
    }
    port.postMessage(JSON.stringify({type: message.type, id: message.id, payload: null, error, isReply: true}));
  });
  port.start();
  window.parent.postMessage("experimental.bootstrap", "*", [channel.port2]);
  return true;
}
