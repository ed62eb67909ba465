// A Node.js service calling scanjobs the way other teams will: stubs loaded from our .proto.
// Usage: node client.js TARGET LIBRARY_DIR GATED_DIR
// Prints one JSON object with what it saw; the Python test asserts on it.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', '..', 'protos');
const definition = loader.loadSync(path.join(PROTOS, 'scanjobs', 'v1', 'scanjobs.proto'), {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  includeDirs: [PROTOS],
});
const { ScanService } = grpc.loadPackageDefinition(definition).scanjobs.v1;

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 10000 }, (err, reply) =>
      err ? reject(err) : resolve(reply));
  });
}

// Follows a job to its terminal event; `onEvent` may act on each event as it comes.
function watch(client, jobId, onEvent) {
  return new Promise((resolve, reject) => {
    const events = [];
    const stream = client.WatchJob({ job_id: jobId });
    stream.on('data', (event) => {
      events.push(event);
      if (onEvent) onEvent(event);
    });
    stream.on('error', reject);
    stream.on('end', () => resolve(events));
  });
}

async function main() {
  const [target, library, gated] = process.argv.slice(2);
  const client = new ScanService(target, grpc.credentials.createInsecure());
  const seen = {};

  const job = await call(client, 'SubmitScan', { path: library });
  const events = await watch(client, job.id);
  const last = events[events.length - 1].job;
  seen.completed = { state: last.state, added: Number(last.result.added), events: events.length };

  const held = await call(client, 'SubmitScan', { path: gated });
  let cancelReply = null;
  const heldEvents = await watch(client, held.id, (event) => {
    if (event.job.state === 'JOB_STATE_RUNNING' && cancelReply === null) {
      cancelReply = call(client, 'CancelJob', { job_id: held.id });
    }
  });
  const cancelled = await cancelReply;
  seen.cancelled = {
    reply_cancel_requested: cancelled.cancel_requested,
    final_state: heldEvents[heldEvents.length - 1].job.state,
  };

  try {
    await call(client, 'SubmitScan', { path: '/etc' });
    seen.error = { code: 0 };
  } catch (err) {
    seen.error = {
      code: err.code,
      name: grpc.status[err.code],
      details: err.details,
      has_status_details: err.metadata.get('grpc-status-details-bin').length > 0,
    };
  }
  client.close();
  process.stdout.write(JSON.stringify(seen) + '\n');
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + '\n');
  process.exit(1);
});
