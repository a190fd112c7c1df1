import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    // The suite's own default (5 s per test); long-poll tests rely on the
    // server answering within it.
    testTimeout: 5000,
  },
})
