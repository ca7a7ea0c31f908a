// A proxyless gRPC client under Node (@grpc/grpc-js with @grpc/grpc-js-xds), driven by
// JSON lines on stdin, answering JSON lines on stdout: the same protocol as the Python
// client in greeter.py (`ClientProtocol`). The xDS bootstrap comes from
// GRPC_XDS_BOOTSTRAP_CONFIG; the target is argv[2] (xds:///SERVICE).
'use strict';

const grpc = require('@grpc/grpc-js');
require('@grpc/grpc-js-xds').register();
const readline = require('readline');

const METHOD = '/graylane.demo.Greeter/Hello';
const CALL_TIMEOUT_MS = 5000;
const identity = (x) => x;
const client = new grpc.Client(process.argv[2], grpc.credentials.createInsecure());

function pathOf(answer) {
  return JSON.parse(answer.toString()).hops
    .map((h) => `${h.service}:${h.version}` + (h.lane ? `@${h.lane}` : ''))
    .join('>');
}

function newTally() {
  return { ok: 0, failed: 0, paths: {}, errors: {} };
}

function one(tally, pairs, waitForReady) {
  const metadata = new grpc.Metadata();
  for (const [k, v] of pairs) metadata.add(k, String(v));
  return new Promise((resolve) => {
    client.makeUnaryRequest(
      METHOD, identity, identity, Buffer.from('{}'), metadata,
      { deadline: Date.now() + CALL_TIMEOUT_MS, waitForReady: waitForReady },
      (err, answer) => {
        if (err) {
          tally.failed += 1;
          const key = `${grpc.status[err.code]}: ${err.details}`.slice(0, 200);
          tally.errors[key] = (tally.errors[key] || 0) + 1;
        } else {
          tally.ok += 1;
          const p = pathOf(answer);
          tally.paths[p] = (tally.paths[p] || 0) + 1;
        }
        resolve();
      });
  });
}

let background = null;

async function handle(command) {
  const pairs = command.metadata || [];
  const concurrency = Math.max(1, Math.min(command.concurrency || 8, 64));
  if (command.op === 'ready') {
    const tally = newTally();
    const deadline = Date.now() + (command.timeout || 20) * 1000;
    while (tally.ok === 0 && Date.now() < deadline) await one(tally, pairs, true);
    return tally;
  }
  if (command.op === 'call') {
    const tally = newTally();
    let left = Math.min(command.count, 100000);
    const stopAt = Date.now() + (command.max_seconds || 30) * 1000;
    const began = Date.now();
    const worker = async () => {
      while (left > 0 && Date.now() < stopAt) {
        left -= 1;
        await one(tally, pairs, false);
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    tally.seconds = (Date.now() - began) / 1000;
    return tally;
  }
  if (command.op === 'keyed') {
    const tally = newTally();
    const byKey = {};
    const keys = (command.keys || []).slice(0, 10000);
    let next = 0;
    const worker = async () => {
      while (next < keys.length) {
        const key = String(keys[next]);
        next += 1;
        const single = newTally();
        await one(single, [...pairs, [command.header, key]], false);
        tally.ok += single.ok;
        tally.failed += single.failed;
        Object.assign(tally.errors, single.errors);
        byKey[key] = Object.keys(single.paths)[0] || '';
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    tally.by_key = byKey;
    return tally;
  }
  if (command.op === 'start') {
    const tally = newTally();
    const state = { stop: false };
    const endAt = Date.now() + 600 * 1000;
    const steady = async () => {
      while (!state.stop && Date.now() < endAt) await one(tally, pairs, false);
    };
    background = { tally, state, done: Promise.all(Array.from({ length: concurrency }, steady)) };
    return { started: true };
  }
  if (command.op === 'stop') {
    if (!background) return { error: 'not started' };
    const { tally, state, done } = background;
    background = null;
    state.stop = true;
    await done;
    return tally;
  }
  if (command.op === 'exit') return null;
  return { error: `unknown op ${command.op}` };
}

async function main() {
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    const answer = await handle(JSON.parse(line));
    if (answer === null) break;
    process.stdout.write(JSON.stringify(answer) + '\n');
  }
  client.close();
  process.exit(0);
}

process.on('SIGTERM', () => process.exit(0));
main();
