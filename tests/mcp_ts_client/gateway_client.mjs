// The TypeScript SDK client through keyplane's MCP gateway (/mcp/{name}) for tests/test_mcp_gateway_everything.py.
// Usage: node gateway_client.mjs URL TOKEN  → prints one JSON object describing what it saw.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "keyplane-ts-gateway-test", version: "1.0.0" });
const out = {};

async function attempt(label, fn) {
  try {
    out[label] = await fn();
  } catch (err) {
    out[label] = { error: String(err?.message ?? err) };
  }
}

await client.connect(transport);
out.sessionId = transport.sessionId ?? null;
await attempt("tools", async () => (await client.listTools()).tools.map((t) => t.name).sort());
await attempt("echo", async () => (await client.callTool({ name: "echo", arguments: { message: "hi" } })).content[0].text);
await attempt("sum", async () => (await client.callTool({ name: "get-sum", arguments: { a: 2, b: 3 } })).content[0].text);
await attempt("env", async () => (await client.callTool({ name: "get-env", arguments: {} })).content[0].text);
await attempt("resources", async () => (await client.listResources()).resources.length);
await attempt("prompts", async () => (await client.listPrompts()).prompts.map((p) => p.name).sort());
const progress = [];
await attempt("long", async () => {
  const result = await client.callTool(
    { name: "trigger-long-running-operation", arguments: { duration: 1, steps: 3 } },
    undefined,
    { onprogress: (p) => progress.push(p.progress) },
  );
  return result.content[0].text;
});
out.progress = progress;
await transport.terminateSession().catch(() => {});
await client.close();
console.log(JSON.stringify(out));
