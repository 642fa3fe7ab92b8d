// The README's usage example; `npm run typecheck` (and tests/unit/test_ts_client_codegen.py) keeps it
// compiling against the generated code.
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { BadRequestSchema } from "@sophia/gateway-client/errors";
import { GatewayService } from "@sophia/gateway-client/gateway";

const gateway = createClient(GatewayService, createGrpcTransport({ baseUrl: "http://127.0.0.1:50051" }));
const headers = { authorization: "Bearer sk-sophia-dev" };
const answer = await gateway.createChatCompletion(
  { params: { model: "auto", maxTokens: 64, messages: [{ role: "user", text: "Name a colour." }] } },
  { headers, timeoutMs: 30_000 },
);
console.log(answer.choices[0].message?.content, answer.usage?.totalTokens);
for await (const chunk of gateway.streamChatCompletion(
  { params: { model: "auto", messages: [{ role: "user", text: "Hi" }] } }, { headers })) {
  process.stdout.write(chunk.choices[0]?.delta?.content ?? "");
}
const { data } = await gateway.createEmbeddings({ model: "all-minilm-l6-v2", texts: ["hi"] }, { headers });
console.log(data[0].vector.length); // 384
try {
  await gateway.createChatCompletion({ params: { model: "auto", messages: [{ role: "robot", text: "x" }] } }, { headers });
} catch (error) {
  if (error instanceof ConnectError && error.code === Code.InvalidArgument) {
    console.log(error.findDetails(BadRequestSchema)[0].fieldViolations[0].field); // messages[0].role
  }
}
