// A Pub/Sub single message transform on the jobs topic (pubsub.tf). The operations'
// subscriptions are filtered on attributes alone, and a job message (DESIGN.md) names its
// operation in its body: one published without the `operation` attribute gets it, copied
// from the body, so it reaches its operation's workers instead of waiting in the unrouted
// subscription. Storage notifications (eventType, payloadFormat), messages that already carry
// the attribute and anything that is not a JSON object naming an operation pass unchanged.
// It never throws: a transform that fails would fail the publish (a notification's too).
function jobOperationAttribute(message, metadata) {
  try {
    const attributes = message.attributes || {};
    if ("operation" in attributes || "eventType" in attributes || "payloadFormat" in attributes) {
      return message;
    }
    const body = JSON.parse(message.data);
    const isObject = body !== null && typeof body === "object" && !Array.isArray(body);
    const operation = isObject ? body.operation : undefined;
    // An attribute value holds at most 1024 bytes; operations and chains are far shorter.
    if (typeof operation !== "string" || operation.length === 0 || operation.length > 256) {
      return message;
    }
    return { data: message.data, attributes: Object.assign({}, attributes, { operation: operation }) };
  } catch (error) {
    return message;
  }
}
