// The README's usage example; `npm run typecheck` keeps it compiling against the generated code.
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { GatewayService } from "@sophia/gateway-client/gateway";

const transport = createGrpcTransport({ baseUrl: "http://127.0.0.1:50051" });
const gateway = createClient(GatewayService, transport);
const headers = { authorization: `Bearer ${process.env.SOPHIA_API_KEY}` };

try {
  const answer = await gateway.createChatCompletion(
    { params: { model: "auto", maxTokens: 64, messages: [{ role: "user", text: "Name a colour." }] } },
    { headers, timeoutMs: 30_000 },
  );
  console.log(answer.choices[0].message?.content, answer.usage?.totalTokens);
  for await (const chunk of gateway.streamChatCompletion({ params: { model: "auto", messages: [{ role: "user", text: "Hi" }] } }, { headers })) {
    process.stdout.write(chunk.choices[0]?.delta?.content ?? "");
  }
} catch (error) {
  if (error instanceof ConnectError && error.code === Code.InvalidArgument) console.error(error.rawMessage);
  else throw error;
}
