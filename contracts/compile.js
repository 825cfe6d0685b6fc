#!/usr/bin/env node
// Compile contracts/src/Registry.sol with the pinned solc-js (standard JSON) and write the
// artifact the Python side deploys and CI checks for drift:
//
//     node contracts/compile.js [OUT_PATH]    # default: contracts/artifacts/Registry.json
//
// The output is deterministic (sorted keys, 2-space indent, trailing newline) and independent
// of where the repository lives: sources are named by logical path, never by absolute path.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const CONTRACT_NAME = "Registry";
const SOURCE_NAME = "src/Registry.sol";
const SOURCE_PATH = path.join(__dirname, SOURCE_NAME);
const DEFAULT_OUT = path.join(__dirname, "artifacts", `${CONTRACT_NAME}.json`);
const EVM_VERSION = "cancun";
const OPTIMIZER = { enabled: true, runs: 200 };
const OZ_PREFIX = "@openzeppelin/contracts/";

// Resolve OpenZeppelin imports from the repo's node_modules only, and refuse anything that
// would step outside the package (the compiler must not read arbitrary files).
function findImports(importPath) {
  if (!importPath.startsWith(OZ_PREFIX)) {
    return { error: `import not allowed: ${importPath} (only ${OZ_PREFIX}...)` };
  }
  const ozRoot = path.dirname(require.resolve("@openzeppelin/contracts/package.json"));
  const file = path.resolve(ozRoot, importPath.slice(OZ_PREFIX.length));
  if (!file.startsWith(ozRoot + path.sep)) {
    return { error: `import escapes ${OZ_PREFIX}: ${importPath}` };
  }
  try {
    return { contents: fs.readFileSync(file, "utf8") };
  } catch (err) {
    return { error: `cannot read ${importPath}: ${err.message}` };
  }
}

// JSON.stringify with object keys sorted at every level, so the artifact is byte-stable.
function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const key of Object.keys(value).sort()) out[key] = sortKeys(value[key]);
    return out;
  }
  return value;
}

function main() {
  const outPath = path.resolve(process.argv[2] || DEFAULT_OUT);
  const source = fs.readFileSync(SOURCE_PATH, "utf8");
  const input = {
    language: "Solidity",
    sources: { [SOURCE_NAME]: { content: source } },
    settings: {
      optimizer: OPTIMIZER,
      evmVersion: EVM_VERSION,
      outputSelection: {
        [SOURCE_NAME]: {
          [CONTRACT_NAME]: ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"],
        },
      },
    },
  };

  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const diagnostics = output.errors || [];
  for (const d of diagnostics) process.stderr.write(d.formattedMessage || d.message);
  if (diagnostics.some((d) => d.severity === "error")) {
    process.stderr.write("compile.js: solc reported errors; no artifact written\n");
    process.exit(1);
  }
  const contract = ((output.contracts || {})[SOURCE_NAME] || {})[CONTRACT_NAME];
  if (!contract || !contract.evm.bytecode.object) {
    process.stderr.write(`compile.js: solc produced no bytecode for ${CONTRACT_NAME}\n`);
    process.exit(1);
  }

  const artifact = {
    contractName: CONTRACT_NAME,
    sourceName: SOURCE_NAME,
    sourceSha256: crypto.createHash("sha256").update(source, "utf8").digest("hex"),
    abi: contract.abi,
    bytecode: "0x" + contract.evm.bytecode.object,
    deployedBytecode: "0x" + contract.evm.deployedBytecode.object,
    compiler: { name: "solc-js", version: solc.version() },
    evmVersion: EVM_VERSION,
    optimizer: OPTIMIZER,
  };
  fs.mkdirSync(path.dirname(outPath), { recursive: true });
  fs.writeFileSync(outPath, JSON.stringify(sortKeys(artifact), null, 2) + "\n");
}

main();
