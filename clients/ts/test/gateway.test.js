// The generated client against a running Sophia Gateway, over gRPC (HTTP/2, plaintext).
// SOPHIA_GATEWAY_ADDRESS=host:port and SOPHIA_API_KEY=<key> name the Gateway and a tenant's key;
// tests/integration/test_ts_client.py runs this against the test mesh (local chat and embedding models).
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { BadRequestSchema } from "@sophia/gateway-client/errors";
import { GatewayService } from "@sophia/gateway-client/gateway";

const address = process.env.SOPHIA_GATEWAY_ADDRESS;
const apiKey = process.env.SOPHIA_API_KEY;
if (!address || !apiKey) {
  throw new Error("set SOPHIA_GATEWAY_ADDRESS (host:port) and SOPHIA_API_KEY");
}

/** A client whose every call carries `key` as its bearer token. */
function gatewayClient(key) {
  const transport = createGrpcTransport({
    baseUrl: `http://${address}`,
    interceptors: [
      (next) => (request) => {
        request.header.set("authorization", `Bearer ${key}`);
        return next(request);
      },
    ],
  });
  return createClient(GatewayService, transport);
}

const gateway = gatewayClient(apiKey);
// The local model is slow on a busy CPU; every call still has a deadline.
const timeoutMs = 60_000;

/** A prompt no other run has sent, so the response cache cannot answer for the model. */
function fresh(prompt) {
  return `${prompt} (${randomUUID()})`;
}

/** The ConnectError `call` rejects with (fails the test when it resolves). */
async function rejection(call) {
  const error = await call.then(
    () => assert.fail("the call succeeded"),
    (caught) => caught,
  );
  assert.ok(error instanceof ConnectError, `not a ConnectError: ${error}`);
  return error;
}

test("unary chat answers with text and usage", async () => {
  const response = await gateway.createChatCompletion(
    { params: { model: "auto", maxTokens: 16, messages: [{ role: "user", text: fresh("Name a colour.") }] } },
    { timeoutMs },
  );
  assert.equal(response.object, "chat.completion");
  assert.equal(response.model, "smollm2-135m-instruct");
  assert.equal(response.choices.length, 1);
  const [choice] = response.choices;
  // `optional` in the proto: a zero index is present, not merely defaulted.
  assert.equal(choice.index, 0);
  assert.equal(choice.message.role, "assistant");
  assert.ok(choice.message.content.trim(), "empty answer");
  assert.ok(["stop", "length"].includes(choice.finishReason), choice.finishReason);
  assert.ok(response.usage.completionTokens > 0 && response.usage.completionTokens <= 16);
  assert.equal(response.usage.totalTokens, response.usage.promptTokens + response.usage.completionTokens);
});

test("a server stream delivers several chunks, then a finish_reason, then usage", async () => {
  const chunks = [];
  for await (const chunk of gateway.streamChatCompletion(
    {
      params: {
        model: "auto",
        maxTokens: 12,
        streamOptions: { includeUsage: true },
        messages: [{ role: "user", text: fresh("Count from one to ten.") }],
      },
    },
    { timeoutMs },
  )) {
    chunks.push(chunk);
  }
  assert.ok(chunks.every((chunk) => chunk.object === "chat.completion.chunk"));
  assert.equal(new Set(chunks.map((chunk) => chunk.id)).size, 1, "one id for the whole stream");
  const withChoice = chunks.filter((chunk) => chunk.choices.length > 0);
  const deltas = withChoice.map((chunk) => chunk.choices[0].delta.content ?? "").filter((text) => text);
  assert.ok(deltas.length >= 2, `expected several content chunks, got ${deltas.length}`);
  assert.equal(withChoice[0].choices[0].delta.role, "assistant");
  // Only the last chunk of the choice says why it ended.
  const finishes = withChoice.map((chunk) => chunk.choices[0].finishReason);
  assert.ok(finishes.slice(0, -1).every((reason) => reason === undefined), finishes.join());
  assert.ok(["stop", "length"].includes(finishes.at(-1)), finishes.at(-1));
  // include_usage: a final chunk without choices carries the counts.
  const last = chunks.at(-1);
  assert.equal(last.choices.length, 0);
  assert.ok(last.usage.completionTokens > 0 && last.usage.completionTokens <= 12);
});

test("embeddings of typed texts come back as typed vectors", async () => {
  const response = await gateway.createEmbeddings(
    { model: "all-minilm-l6-v2", texts: ["a red apple", "a green field"] },
    { timeoutMs },
  );
  assert.equal(response.model, "all-minilm-l6-v2");
  assert.deepEqual(
    response.data.map((item) => item.index),
    [0, 1],
  );
  for (const item of response.data) {
    assert.equal(item.vector.length, 384);
    // Typed in, typed out: the polymorphic Value field stays unset.
    assert.equal(item.embedding, undefined);
    const norm = Math.hypot(...item.vector);
    assert.ok(Math.abs(norm - 1) < 1e-3, `vector norm ${norm}`);
  }
  assert.notDeepEqual(response.data[0].vector, response.data[1].vector);
  assert.ok(response.usage.promptTokens > 0);
});

test("request metadata goes in and response headers come back", async () => {
  const requestId = `ts-client-${randomUUID()}`;
  let headers;
  const response = await gateway.createChatCompletion(
    { params: { model: "auto", maxTokens: 4, messages: [{ role: "user", text: fresh("Say hi.") }] } },
    { timeoutMs, headers: { "x-request-id": requestId }, onHeader: (received) => (headers = received) },
  );
  assert.equal(headers.get("x-request-id"), requestId);
  assert.equal(headers.get("x-sophia-provider"), "local");
  assert.equal(headers.get("x-sophia-model"), "smollm2-135m-instruct");
  // The request id also names the completion.
  assert.equal(response.id, `chatcmpl-${requestId}`);
});

test("a deadline the answer cannot meet ends the call with DEADLINE_EXCEEDED", async () => {
  const started = Date.now();
  const error = await rejection(
    gateway.createChatCompletion(
      {
        params: {
          model: "auto",
          maxTokens: 1024,
          cache: false,
          messages: [{ role: "user", text: fresh("Write a very long story about a dragon.") }],
        },
      },
      { timeoutMs: 300 },
    ),
  );
  assert.equal(error.code, Code.DeadlineExceeded, error.message);
  // Ended by this deadline, not by a server-side limit much later.
  assert.ok(Date.now() - started < 5_000, `took ${Date.now() - started} ms`);
});

test("an invalid role is INVALID_ARGUMENT naming messages[0].role", async () => {
  const error = await rejection(
    gateway.createChatCompletion(
      { params: { model: "auto", messages: [{ role: "robot", text: "hi" }] } },
      { timeoutMs },
    ),
  );
  assert.equal(error.code, Code.InvalidArgument, error.message);
  assert.match(error.rawMessage, /messages\[0\]\.role/);
  // The field also comes as a google.rpc.BadRequest detail: no parsing of the message needed.
  const [badRequest] = error.findDetails(BadRequestSchema);
  assert.deepEqual(
    badRequest.fieldViolations.map((violation) => violation.field),
    ["messages[0].role"],
  );
});

test("a wrong API key is UNAUTHENTICATED", async () => {
  const error = await rejection(gatewayClient("sk-wrong-wrong-wrong").listModels({}, { timeoutMs }));
  assert.equal(error.code, Code.Unauthenticated, error.message);
});
