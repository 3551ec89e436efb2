# Shared by preinst (pasted in by build-deb.ts): is there a Node.js >= 20.10 where
# /usr/bin/mailha looks for one? Prints the node found, or fails with what to do.
mailha_find_node() {
  for n in "${MAILHA_NODEJS:-}" /usr/local/bin/node "$(command -v node 2>/dev/null || true)"; do
    [ -n "$n" ] && [ -x "$n" ] || continue
    if "$n" -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=10)?0:1)' 2>/dev/null; then
      echo "$n"
      return 0
    fi
    echo "mailha: $n is $("$n" --version 2>/dev/null || echo 'not runnable'), older than 20.10" >&2
  done
  return 1
}
