// Drive Open WebUI in Debian's headless chromium (npm playwright-core): open the UI, pick a
// model, send a prompt, wait until the answer is complete, save a screenshot.
// Usage: node openwebui_browser.js '{"playwright": DIR, "url": ..., "model": ..., "prompt": ...,
//                                     "screenshot": PATH}'
// Prints {"answer": TEXT, "steps": {step: attempts}} on stdout; exits 1 with the step that
// failed after its retries. Steps are retried (a first visit sometimes loses a click to a
// re-render: "element was detached"); waits are generous, so a slow machine is not a failure.
'use strict';
const args = JSON.parse(process.argv[2]);
const { chromium } = require(args.playwright);

const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run',
];
const STEP_TIMEOUT_MS = 60000;
const ANSWER_TIMEOUT_MS = 300000;
const steps = {};

async function step(name, attempts, fn) {
  for (let n = 1; ; n++) {
    steps[name] = n;
    try {
      return await fn();
    } catch (err) {
      if (n >= attempts) throw new Error(`${name} failed after ${n} attempts: ${err.message}`);
      process.stderr.write(`retrying ${name}: ${err.message.split('\n')[0]}\n`);
    }
  }
}

async function main() {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: CHROMIUM_ARGS });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    page.setDefaultTimeout(STEP_TIMEOUT_MS);
    await step('open', 3, async () => {
      await page.goto(args.url, { waitUntil: 'domcontentloaded' });
      await page.locator('#chat-input').waitFor({ state: 'visible' });
    });
    // A first visit shows the "what's new" dialog over the chat, a moment after the page.
    const letsGo = page.getByRole('button', { name: "Okay, Let's Go!" });
    await step('dismiss release notes', 3, async () => {
      await letsGo.waitFor({ state: 'visible', timeout: 15000 }).catch(() => {});
      if (await letsGo.isVisible()) await letsGo.click();
      await letsGo.waitFor({ state: 'hidden' });
    });
    const selector = page.locator('#model-selector-model-button');
    await step('pick model', 4, async () => {
      await selector.click();
      await page.locator(`button[data-value="${args.model}"]`).first().click();
      await page.waitForFunction(
        (model) => document.getElementById('model-selector-model-button')
          .getAttribute('aria-label').endsWith(`: ${model}`),
        args.model, { timeout: 10000 },
      );
    });
    const response = page.locator('#response-content-container');
    await step('send prompt', 3, async () => {
      if (await response.count()) return; // sent by an attempt that failed after the click
      await page.locator('#chat-input').click();
      await page.keyboard.press('Control+A');
      await page.keyboard.press('Backspace');
      await page.keyboard.type(args.prompt);
      await page.locator('#send-message-button').click();
      await response.first().waitFor({ state: 'attached' });
    });
    // Open WebUI shows a response's action buttons (Regenerate, …) once its stream has ended.
    await page.locator('button[aria-label="Regenerate"]:visible').first()
      .waitFor({ state: 'visible', timeout: ANSWER_TIMEOUT_MS });
    const answer = (await response.first().innerText()).trim();
    await page.screenshot({ path: args.screenshot });
    process.stdout.write(JSON.stringify({ answer, steps }) + '\n');
  } catch (err) {
    // What the page showed when the step failed, beside the screenshot's path.
    const pages = browser.contexts().flatMap((c) => c.pages());
    if (pages.length) await pages[0].screenshot({ path: `${args.screenshot}.failed.png` }).catch(() => {});
    throw err;
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.stdout.write(JSON.stringify({ error: String(err.message || err), steps }) + '\n');
  process.exit(1);
});
