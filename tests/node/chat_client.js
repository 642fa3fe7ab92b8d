// Calls sophia.gateway.v1.GatewayService from Node.js with stubs loaded from our .proto files.
// Usage: node chat_client.js <host:port> <api key> <prompt>; prints the response as JSON.
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, apiKey, prompt] = process.argv.slice(2);
const repo = path.resolve(__dirname, "..", "..");
const definition = protoLoader.loadSync("sophia/gateway/v1/gateway.proto", {
  includeDirs: [path.join(repo, "protos"), path.join(repo, "build", "protodeps")],
  keepCase: true,
  longs: Number,
  defaults: true,
});
const gateway = grpc.loadPackageDefinition(definition).sophia.gateway.v1;
const client = new gateway.GatewayService(address, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
metadata.add("authorization", `Bearer ${apiKey}`);
const request = {
  params: { model: "auto", max_tokens: 16, messages: [{ role: "user", content: { stringValue: prompt } }] },
};
const deadline = new Date(Date.now() + 60000);
client.CreateChatCompletion(request, metadata, { deadline }, (error, response) => {
  if (error) {
    console.log(JSON.stringify({ code: error.code, details: error.details }));
    process.exit(1);
  }
  console.log(JSON.stringify(response));
});
