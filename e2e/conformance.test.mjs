// Runs the pinned official conformance suite (see package.json) against the
// server named by CONFORMANCE_TEST_URL. The package's own CLI cannot run its
// runner from node_modules under vitest 4 (node_modules is excluded), so this
// file calls the suite's exported entry point instead.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_TEST_URL
if (!baseUrl) {
  throw new Error("CONFORMANCE_TEST_URL is required (make conformance sets it)")
}
// The suite's optional subscription tests ("Reserved subscription APIs") are
// on: the server must then allow webhooks to loopback and refuse other private
// addresses (DSGW_WEBHOOK_ALLOW_PRIVATE=loopback).
runConformanceTests({ baseUrl, subscriptions: true })
