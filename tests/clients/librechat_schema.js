// Validate a librechat.yaml (given as JSON on stdin) the way LibreChat loads it: the whole file
// against librechat-data-provider's `configSchema`, then each `endpoints.custom` entry against
// its `endpointSchema` (LibreChat's loader checks custom endpoints one by one).
// Usage: node librechat_schema.js PATH_TO_librechat-data-provider < config.json
// Prints {"ok": bool, "config_version": "...", "issues": [...]} and exits 0 either way.
'use strict';
const provider = require(process.argv[2]);

let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const config = JSON.parse(input);
  const issues = [];
  const whole = provider.configSchema.safeParse(config);
  if (!whole.success) issues.push(...whole.error.issues.map((i) => ({ where: 'config', ...i })));
  const custom = (config.endpoints && config.endpoints.custom) || [];
  custom.forEach((endpoint, n) => {
    const one = provider.endpointSchema.safeParse(endpoint);
    if (!one.success) issues.push(...one.error.issues.map((i) => ({ where: `custom[${n}]`, ...i })));
  });
  const out = { ok: issues.length === 0, config_version: provider.Constants.CONFIG_VERSION, issues };
  process.stdout.write(JSON.stringify(out) + '\n');
});
