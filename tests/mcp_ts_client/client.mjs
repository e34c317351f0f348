// An independent MCP client for keyplane's tests: the official TypeScript SDK over Streamable HTTP.
// Usage: node client.mjs URL TOKEN  → prints one JSON object describing what it saw.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token] = process.argv.slice(2);

async function connect(bearer) {
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${bearer}` } },
  });
  const client = new Client({ name: "keyplane-ts-test", version: "1.0.0" });
  await client.connect(transport);
  return { client, transport };
}

const out = {};
const { client, transport } = await connect(token);
out.protocolVersion = transport.protocolVersion ?? null;
out.sessionId = transport.sessionId ?? null;
out.tools = (await client.listTools()).tools.map((t) => ({
  name: t.name,
  readOnly: t.annotations?.readOnlyHint ?? null,
  destructive: t.annotations?.destructiveHint ?? null,
}));
const created = await client.callTool({
  name: "keyplane_create_virtual_key",
  arguments: { name: "from-typescript", cost_center: "ts" },
});
out.created = { isError: created.isError ?? false, structured: created.structuredContent };
const listed = await client.callTool({ name: "keyplane_list_virtual_keys", arguments: { cost_center: "ts" } });
out.listed = listed.structuredContent;
const missing = await client.callTool({ name: "keyplane_rotate_virtual_key", arguments: { key_id: "key_nope" } });
out.missing = { isError: missing.isError ?? false, text: missing.content?.[0]?.text ?? "" };
const revoked = await client.callTool({
  name: "keyplane_revoke_virtual_key",
  arguments: { key_id: created.structuredContent.key.id },
});
out.revoked = revoked.structuredContent;
await client.close();

try {
  await connect("mcp_sa_" + "A".repeat(37));
  out.badToken = "connected";
} catch (err) {
  out.badToken = String(err?.message ?? err);
}
console.log(JSON.stringify(out));
