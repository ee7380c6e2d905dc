#!/usr/bin/env bash
# Local Apache Kafka (KRaft) for sessionizer development and tests -- no Docker needed.
#
# The broker runs straight from Maven Central jars (see scripts/kafka/pom.xml), with Java 17+.
# Every listener is bound to 127.0.0.1. See scripts/kafka/README.md for details.
#
#   scripts/kafka.sh fetch
#   scripts/kafka.sh start [--nodes 1|3] [--dir DIR] [--port BASE] [--sasl] [--tls] [--prop key=value]...
#   scripts/kafka.sh stop [--dir DIR] [--clean]
#   scripts/kafka.sh status [--dir DIR]
#   scripts/kafka.sh kill-node N [--dir DIR]
#   scripts/kafka.sh start-node N [--dir DIR]
#   scripts/kafka.sh topics [--dir DIR] -- <TopicCommand args>
#   scripts/kafka.sh tool NAME|CLASS [--dir DIR] -- <args>
#   scripts/kafka.sh bootstrap [--dir DIR]
#   scripts/kafka.sh libs
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_ASSETS="$SCRIPT_DIR/kafka"
POM="$KAFKA_ASSETS/pom.xml"
BROKER_LOG4J="$KAFKA_ASSETS/log4j2.properties"
TOOLS_LOG4J="$KAFKA_ASSETS/tools-log4j2.properties"

DEFAULT_DIR="${KAFKA_DIR:-/tmp/sessionizer-kafka}"
DEFAULT_PORT=9092
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"   # seconds, for all nodes together
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"     # seconds before SIGKILL
KAFKA_HEAP="${KAFKA_HEAP:--Xms256m -Xmx512m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true}"
KAFKA_TOOLS_HEAP="${KAFKA_TOOLS_HEAP:--Xmx256m}"
READY_LINE="Kafka Server started"
# The one user of the SASL listeners (`start --sasl`), for tests and trials: not a secret.
SASL_USER="sessionizer"
SASL_PASSWORD="sessionizer-secret"

PROG="scripts/kafka.sh"

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
info() { printf '%s: %s\n' "$PROG" "$*" >&2; }

usage() {
  cat >&2 <<EOF
usage: $PROG <command> [options]

commands:
  fetch                         download the Kafka jars (once) into the cache
  start [--nodes 1|3] [--dir DIR] [--port BASE] [--sasl] [--tls] [--prop key=value]...
                                format and start a fresh cluster (wipes DIR's previous cluster),
                                wait until every node is ready, print bootstrap servers last;
                                --sasl adds a SASL_PLAINTEXT listener per node on the ports
                                after the others (PLAIN and SCRAM-SHA-256/512, one user:
                                $SASL_USER / $SASL_PASSWORD; see 'bootstrap --sasl');
                                --tls adds an SSL listener per node after those, with a
                                certificate for 127.0.0.1 signed by a CA made for the
                                cluster (DIR/tls/ca.pem; see 'bootstrap --tls'), and
                                one that also requires a client certificate signed by
                                that CA (DIR/tls/client.p12; see 'bootstrap --mtls');
                                both add a SASL_SSL listener per node
                                (see 'bootstrap --sasl-ssl')
  stop [--dir DIR] [--clean]    stop all nodes (SIGTERM, then SIGKILL after ${STOP_TIMEOUT}s);
                                --clean also deletes DIR
  status [--dir DIR]            show which nodes run (exit 0 only if all nodes run)
  kill-node N [--dir DIR]       kill -9 node N (failover tests)
  start-node N [--dir DIR]      restart a stopped node (no reformat) and wait until ready
  topics [--dir DIR] -- ARGS    org.apache.kafka.tools.TopicCommand ARGS
  tool NAME|CLASS [--dir DIR] -- ARGS
                                run a Kafka CLI tool (NAME below, or a main class)
  bootstrap [--dir DIR] [--sasl|--tls|--sasl-ssl|--mtls]
                                print the bootstrap servers of the cluster in DIR (--sasl: of
                                its SASL_PLAINTEXT listeners, --tls: of its SSL listeners,
                                --sasl-ssl: of its SASL_SSL listeners, --mtls: of its SSL
                                listeners that require a client certificate)
  libs                          fetch if needed, print the jar directory

tool NAMEs: $(printf '%s\n' "${!TOOL_ALIASES[@]}" | sort | tr '\n' ' ')

topics/tool add --bootstrap-server for the cluster in DIR unless ARGS contain one.
Ports: node N uses BASE+2(N-1) (PLAINTEXT) and BASE+2(N-1)+1 (CONTROLLER); BASE defaults to $DEFAULT_PORT.
DIR defaults to \$KAFKA_DIR or /tmp/sessionizer-kafka.
environment: KAFKA_CACHE (default ~/.cache/sessionizer/kafka), KAFKA_DIR, KAFKA_HEAP (default
  "-Xms256m -Xmx512m" per node), KAFKA_JVM_OPTS, KAFKA_TOOLS_HEAP, KAFKA_START_TIMEOUT (90),
  KAFKA_STOP_TIMEOUT (30), KAFKA_MVN_ARGS (extra mvn arguments for fetch), JAVA_HOME.
EOF
}

declare -A TOOL_ALIASES=(
  [topics]=org.apache.kafka.tools.TopicCommand
  [console-producer]=org.apache.kafka.tools.ConsoleProducer
  [console-consumer]=org.apache.kafka.tools.consumer.ConsoleConsumer
  [consumer-groups]=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand
  [transactions]=org.apache.kafka.tools.TransactionsCommand
  [metadata-quorum]=org.apache.kafka.tools.MetadataQuorumCommand
  [get-offsets]=org.apache.kafka.tools.GetOffsetShell
  [configs]=org.apache.kafka.tools.ConfigCommand
  [delete-records]=org.apache.kafka.tools.DeleteRecordsCommand
  [producer-perf-test]=org.apache.kafka.tools.ProducerPerformance
  [consumer-perf-test]=org.apache.kafka.tools.ConsumerPerformance
  [leader-election]=org.apache.kafka.tools.LeaderElectionCommand
  [storage]=kafka.tools.StorageTool
)

# ---------------------------------------------------------------------------------------------
# prerequisites and the jar cache

find_java() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    JAVA="$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then
    JAVA="$(command -v java)"
  else
    die "java not found (need Java 17+): install a JDK/JRE, e.g. 'apt-get install openjdk-17-jre-headless', or set JAVA_HOME"
  fi
  local ver major
  ver="$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)"
  major="${ver%%.*}"
  [[ "$major" == 1 ]] && major="$(cut -d. -f2 <<<"$ver")"
  if [[ "$major" =~ ^[0-9]+$ ]] && (( major < 17 )); then
    die "Kafka 4.x needs Java 17+, but $JAVA is version $ver"
  fi
}

kafka_version() {
  local v
  v="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
  [[ -n "$v" ]] || die "cannot read <kafka.version> from $POM"
  printf '%s\n' "$v"
}

cache_root() { printf '%s\n' "${KAFKA_CACHE:-$HOME/.cache/sessionizer/kafka}"; }
libs_dir() { printf '%s/%s/libs\n' "$(cache_root)" "$(kafka_version)"; }

libs_complete() { [[ -f "$1/.complete" ]]; }

cmd_fetch() {
  [[ $# -eq 0 ]] || die "fetch takes no arguments"
  local libs version tmp start_s
  version="$(kafka_version)"
  libs="$(libs_dir)"
  if libs_complete "$libs"; then
    info "Kafka $version jars already in $libs"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found: install Maven 3.6.3+ (e.g. 'apt-get install maven') to download the Kafka jars"
  find_java
  mkdir -p "$(dirname "$libs")"
  tmp="$(mktemp -d "$(dirname "$libs")/libs.tmp.XXXXXX")"
  FETCH_TMP="$tmp"
  trap 'rm -rf "${FETCH_TMP:-}"' EXIT   # no half-filled temp dir after Ctrl-C or failure
  info "downloading Kafka $version jars from Maven Central into $libs ..."
  start_s=$SECONDS
  # -C: fail on checksum mismatch. Debian's Maven 3.8 prints bare ANSI reset codes even in
  # batch mode; strip them.
  # shellcheck disable=SC2086
  if ! mvn -B -q -C -f "$POM" ${KAFKA_MVN_ARGS:-} dependency:copy-dependencies \
      "-Dmdep.outputDirectory=$tmp" 2>&1 | sed -u -e 's/\x1b\[[0-9;]*m//g' -e '/^$/d' >&2; then
    rm -rf "$tmp"
    die "mvn dependency:copy-dependencies failed (is Maven Central reachable? see the output above)"
  fi
  compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || { rm -rf "$tmp"; die "download incomplete: no kafka_2.13 jar in $tmp"; }
  compgen -G "$tmp/kafka-tools-[0-9]*.jar" >/dev/null || { rm -rf "$tmp"; die "download incomplete: no kafka-tools jar in $tmp"; }
  compgen -G "$tmp/log4j-core-*.jar" >/dev/null || { rm -rf "$tmp"; die "download incomplete: no log4j-core jar in $tmp"; }
  date -u +%FT%TZ >"$tmp/.complete"
  rm -rf "$libs"
  mv "$tmp" "$libs"
  FETCH_TMP=""
  info "fetched $(find "$libs" -name '*.jar' | wc -l) jars ($(du -sh "$libs" | cut -f1)) in $((SECONDS - start_s))s"
}

ensure_libs() {
  LIBS="$(libs_dir)"
  libs_complete "$LIBS" || cmd_fetch
  find_java
}

# ---------------------------------------------------------------------------------------------
# cluster directory state

abs_dir() {  # absolute path without requiring existence
  local d="$1"
  [[ "$d" == /* ]] || d="$PWD/$d"
  printf '%s\n' "$d"
}

state_file() { printf '%s/cluster.env\n' "$DIR"; }

read_state() {  # cluster.env of DIR -> NODES BASE_PORT CLUSTER_ID STATE_LIBS KAFKA_VERSION
  local f
  f="$(state_file)"
  [[ -f "$f" ]] || die "no cluster in $DIR (run '$PROG start --dir $DIR' first)"
  # Clusters started before --sasl/--tls existed have neither key.
  SASL=0 TLS=0
  # shellcheck source=/dev/null
  source "$f"
}

check_node_number() {
  if ! [[ "$1" =~ ^[0-9]+$ ]] || (($1 < 1 || $1 > NODES)); then
    die "node must be 1..$NODES (got '$1')"
  fi
}

load_state() {  # read_state + jars + java
  read_state
  : "${NODES:?}" "${BASE_PORT:?}" "${CLUSTER_ID:?}" "${STATE_LIBS:?}"
  LIBS="$STATE_LIBS"
  libs_complete "$LIBS" || die "jar directory $LIBS of this cluster is missing; run '$PROG fetch'"
  find_java
}

# Same format as `kafka.tools.StorageTool random-uuid` (16 random bytes, URL-safe base64 without
# padding, never starting with '-'), without paying a JVM start-up for it.
random_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" =~ ^[A-Za-z0-9_][A-Za-z0-9_-]{21}$ ]] && break
  done
  printf '%s\n' "$id"
}

node_dir() { printf '%s/node%s\n' "$DIR" "$1"; }
broker_port() { echo $((BASE_PORT + 2 * ($1 - 1))); }
controller_port() { echo $((BASE_PORT + 2 * ($1 - 1) + 1)); }
sasl_port() { echo $((BASE_PORT + 2 * NODES + $1 - 1)); }
tls_port() { echo $((BASE_PORT + 2 * NODES + ${SASL:-0} * NODES + $1 - 1)); }
# With both --sasl and --tls: SASL over TLS, the usual production setting.
sasl_ssl_port() { echo $((BASE_PORT + 2 * NODES + ${SASL:-0} * NODES + ${TLS:-0} * NODES + $1 - 1)); }
# With --tls: TLS that also requires a client certificate signed by the cluster's CA.
mtls_port() { echo $((BASE_PORT + 2 * NODES + ${SASL:-0} * NODES + ${TLS:-0} * NODES + ${SASL:-0} * ${TLS:-0} * NODES + $1 - 1)); }

# Bootstrap servers of one listener of every node: PORT_FN is broker_port (PLAINTEXT, the
# default), sasl_port, tls_port, sasl_ssl_port or mtls_port.
bootstrap_servers() {
  local port_fn="${1:-broker_port}" n out=""
  for ((n = 1; n <= NODES; n++)); do out+="${out:+,}127.0.0.1:$("$port_fn" "$n")"; done
  printf '%s\n' "$out"
}

# Every port node N listens on.
node_ports() {
  echo "$(broker_port "$1")" "$(controller_port "$1")"
  if ((SASL)); then sasl_port "$1"; fi
  if ((TLS)); then tls_port "$1"; fi
  if ((SASL && TLS)); then sasl_ssl_port "$1"; fi
  if ((TLS)); then mtls_port "$1"; fi
}

# The password of the test certificates' key stores (they guard nothing: a cluster for tests).
TLS_STORE_PASSWORD="sessionizer-tls"

# A CA for this cluster and a certificate for 127.0.0.1 signed by it, in DIR/tls: ca.pem (what
# clients trust, `ssl.ca.location`) and broker.p12 (the brokers' key store). Made with the
# JDK's keytool.
make_tls_material() {
  local d="$DIR/tls" keytool pw="$TLS_STORE_PASSWORD"
  keytool="$(dirname "$(readlink -f "$JAVA")")/keytool"
  [[ -x "$keytool" ]] || die "--tls needs keytool next to $JAVA"
  mkdir -p "$d"
  {
    "$keytool" -genkeypair -alias ca -keyalg RSA -keysize 2048 -dname "CN=sessionizer test CA" \
      -ext bc:c -validity 30 -keystore "$d/ca.p12" -storetype PKCS12 -storepass "$pw" -keypass "$pw" &&
    "$keytool" -exportcert -alias ca -keystore "$d/ca.p12" -storepass "$pw" -rfc -file "$d/ca.pem" &&
    "$keytool" -genkeypair -alias broker -keyalg RSA -keysize 2048 -dname "CN=127.0.0.1" \
      -validity 30 -keystore "$d/broker.p12" -storetype PKCS12 -storepass "$pw" -keypass "$pw" &&
    "$keytool" -certreq -alias broker -keystore "$d/broker.p12" -storepass "$pw" -file "$d/broker.csr" &&
    "$keytool" -gencert -alias ca -keystore "$d/ca.p12" -storepass "$pw" -infile "$d/broker.csr" \
      -outfile "$d/broker.crt" -ext "SAN=IP:127.0.0.1,DNS:localhost" -validity 30 -rfc &&
    "$keytool" -importcert -alias ca -keystore "$d/broker.p12" -storepass "$pw" -file "$d/ca.pem" -noprompt &&
    "$keytool" -importcert -alias broker -keystore "$d/broker.p12" -storepass "$pw" -file "$d/broker.crt" &&
    # For the MTLS listeners: the CA the brokers trust client certificates from, and one
    # client certificate it signed (client.p12, the same password).
    "$keytool" -importcert -alias ca -keystore "$d/truststore.p12" -storetype PKCS12 \
      -storepass "$pw" -file "$d/ca.pem" -noprompt &&
    "$keytool" -genkeypair -alias client -keyalg RSA -keysize 2048 -dname "CN=sessionizer" \
      -validity 30 -keystore "$d/client.p12" -storetype PKCS12 -storepass "$pw" -keypass "$pw" &&
    "$keytool" -certreq -alias client -keystore "$d/client.p12" -storepass "$pw" -file "$d/client.csr" &&
    "$keytool" -gencert -alias ca -keystore "$d/ca.p12" -storepass "$pw" -infile "$d/client.csr" \
      -outfile "$d/client.crt" -validity 30 -rfc &&
    "$keytool" -importcert -alias ca -keystore "$d/client.p12" -storepass "$pw" -file "$d/ca.pem" -noprompt &&
    "$keytool" -importcert -alias client -keystore "$d/client.p12" -storepass "$pw" -file "$d/client.crt"
  } >"$d/keytool.log" 2>&1 || { cat "$d/keytool.log" >&2; die "making the TLS certificates failed"; }
}

# PID of node N if it is running (and really is our Kafka process), else empty.
node_pid() {
  local pidf pid
  pidf="$(node_dir "$1")/kafka.pid"
  [[ -f "$pidf" ]] || return 0
  pid="$(cat "$pidf" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $(node_dir "$1")/server.properties"; then
    printf '%s\n' "$pid"
  fi
}

port_in_use() {  # something accepts connections on 127.0.0.1:$1
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

check_ports_free() {
  local p busy=()
  for p in "$@"; do
    if port_in_use "$p"; then busy+=("$p"); fi
  done
  if ((${#busy[@]})); then
    local owner=""
    if command -v ss >/dev/null 2>&1; then
      owner="$(ss -ltnpH 2>/dev/null | grep -E ":($(IFS='|'; echo "${busy[*]}"))\b" || true)"
    fi
    die "port(s) ${busy[*]} on 127.0.0.1 already in use${owner:+:
$owner}
(another Kafka? try '$PROG stop', or pick other ports with --port BASE)"
  fi
}

write_server_properties() {
  local n="$1" nd voters="" bootstrap_ctl="" i rf isr
  nd="$(node_dir "$n")"
  for ((i = 1; i <= NODES; i++)); do
    voters+="${voters:+,}$i@127.0.0.1:$(controller_port "$i")"
    bootstrap_ctl+="${bootstrap_ctl:+,}127.0.0.1:$(controller_port "$i")"
  done
  if ((NODES == 1)); then rf=1; isr=1; else rf=3; isr=2; fi
  {
    echo "# generated by $PROG start (node $n of $NODES) -- cluster $CLUSTER_ID"
    echo "process.roles=broker,controller"
    echo "node.id=$n"
    if ((NODES == 1)); then
      echo "# single node: dynamic KRaft quorum, formatted with --standalone"
      echo "controller.quorum.bootstrap.servers=$bootstrap_ctl"
    else
      echo "# static KRaft quorum"
      echo "controller.quorum.voters=$voters"
    fi
    local listeners advertised map
    listeners="PLAINTEXT://127.0.0.1:$(broker_port "$n"),CONTROLLER://127.0.0.1:$(controller_port "$n")"
    advertised="PLAINTEXT://127.0.0.1:$(broker_port "$n")"
    map="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    # Clients may also connect with SASL (PLAIN or SCRAM) or TLS; the brokers talk PLAINTEXT.
    # add_listener NAME PROTOCOL PORT: one more client listener of this node.
    add_listener() {
      listeners+=",$1://127.0.0.1:$3"
      advertised+=",$1://127.0.0.1:$3"
      map+=",$1:$2"
    }
    if ((SASL)); then add_listener SASL_PLAINTEXT SASL_PLAINTEXT "$(sasl_port "$n")"; fi
    if ((TLS)); then add_listener SSL SSL "$(tls_port "$n")"; fi
    if ((SASL && TLS)); then add_listener SASL_SSL SASL_SSL "$(sasl_ssl_port "$n")"; fi
    if ((TLS)); then add_listener MTLS SSL "$(mtls_port "$n")"; fi
    echo "listeners=$listeners"
    echo "advertised.listeners=$advertised"
    echo "listener.security.protocol.map=$map"
    if ((SASL)); then
      echo "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
      local l sasl_listeners=(sasl_plaintext)
      if ((TLS)); then sasl_listeners+=(sasl_ssl); fi
      for l in "${sasl_listeners[@]}"; do
        echo "listener.name.$l.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$SASL_USER=\"$SASL_PASSWORD\";"
        echo "listener.name.$l.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;"
        echo "listener.name.$l.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;"
      done
    fi
    if ((TLS)); then
      echo "ssl.keystore.location=$DIR/tls/broker.p12"
      echo "ssl.keystore.type=PKCS12"
      echo "ssl.keystore.password=$TLS_STORE_PASSWORD"
      echo "ssl.key.password=$TLS_STORE_PASSWORD"
      echo "listener.name.mtls.ssl.client.auth=required"
      echo "listener.name.mtls.ssl.truststore.location=$DIR/tls/truststore.p12"
      echo "listener.name.mtls.ssl.truststore.type=PKCS12"
      echo "listener.name.mtls.ssl.truststore.password=$TLS_STORE_PASSWORD"
    fi
    echo "controller.listener.names=CONTROLLER"
    echo "inter.broker.listener.name=PLAINTEXT"
    echo "log.dirs=$nd/data"
    echo "num.partitions=1"
    echo "default.replication.factor=$rf"
    echo "offsets.topic.replication.factor=$rf"
    echo "transaction.state.log.replication.factor=$rf"
    echo "transaction.state.log.min.isr=$isr"
    # Every topic: with acks=all, a write is acknowledged once two replicas have it (three
    # nodes), so one broker's death can neither lose it nor take its partition offline.
    echo "min.insync.replicas=$isr"
    echo "share.coordinator.state.topic.replication.factor=$rf"
    echo "share.coordinator.state.topic.min.isr=$isr"
    echo "group.initial.rebalance.delay.ms=0"
    echo "auto.create.topics.enable=false"
    echo "delete.topic.enable=true"
    if ((${#EXTRA_PROPS[@]})); then
      echo "# --prop overrides"
      printf '%s\n' "${EXTRA_PROPS[@]}"
    fi
  } >"$nd/server.properties"
}

# Launch node N in the background (own session, so Ctrl-C in the caller's terminal does not
# reach it). Records the byte offset of its log so wait_ready only looks at new lines.
launch_node() {
  local n="$1" nd pid
  nd="$(node_dir "$n")"
  touch "$nd/kafka.log"
  LOG_OFFSET[n]="$(stat -c %s "$nd/kafka.log")"
  local setsid_cmd=()
  command -v setsid >/dev/null 2>&1 && setsid_cmd=(setsid)
  # shellcheck disable=SC2086
  (
    cd "$nd"
    exec "${setsid_cmd[@]}" "$JAVA" $KAFKA_HEAP $KAFKA_JVM_OPTS \
      "-Dlog4j2.configurationFile=$BROKER_LOG4J" \
      -cp "$LIBS/*" kafka.Kafka "$nd/server.properties"
  ) >>"$nd/kafka.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$nd/kafka.pid"
  STARTED_PIDS[n]=$pid
}

# Wait until every node in "$@" logged READY_LINE since it was launched.
wait_ready() {
  local deadline=$((SECONDS + START_TIMEOUT)) pending=("$@") n nd still
  while ((${#pending[@]})); do
    still=()
    for n in "${pending[@]}"; do
      nd="$(node_dir "$n")"
      if tail -c "+$((LOG_OFFSET[n] + 1))" "$nd/kafka.log" 2>/dev/null | grep -q "$READY_LINE"; then
        info "node $n ready (127.0.0.1:$(broker_port "$n")) after $((SECONDS - START_S))s"
      elif ! kill -0 "${STARTED_PIDS[$n]}" 2>/dev/null; then
        info "node $n exited during start-up; last lines of $nd/kafka.log:"
        tail -n 25 "$nd/kafka.log" >&2 || true
        return 1
      else
        still+=("$n")
      fi
    done
    pending=("${still[@]+"${still[@]}"}")
    ((${#pending[@]})) || break
    if ((SECONDS >= deadline)); then
      for n in "${pending[@]}"; do
        info "node $n not ready after ${START_TIMEOUT}s; last lines of $(node_dir "$n")/kafka.log:"
        tail -n 15 "$(node_dir "$n")/kafka.log" >&2 || true
      done
      return 1
    fi
    sleep 0.2
  done
}

# SIGTERM the given pids, wait up to STOP_TIMEOUT, then SIGKILL the survivors.
terminate_pids() {
  local pids=("$@") p alive deadline=$((SECONDS + STOP_TIMEOUT))
  ((${#pids[@]})) || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  while :; do
    alive=()
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
    ((${#alive[@]})) || return 0
    if ((SECONDS >= deadline)); then
      info "still running after ${STOP_TIMEOUT}s, sending SIGKILL to ${alive[*]}"
      kill -KILL "${alive[@]}" 2>/dev/null || true
      sleep 0.5
      return 0
    fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------------------------------------
# commands

parse_dir_only() {  # [--dir DIR] ; sets DIR and REST (after an optional "--")
  DIR="$DEFAULT_DIR"; REST=()
  while (($#)); do
    case "$1" in
      --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; DIR="$2"; shift 2 ;;
      --dir=*) DIR="${1#--dir=}"; shift ;;
      --) shift; REST=("$@"); break ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  DIR="$(abs_dir "$DIR")"
}

cmd_start() {
  NODES=1; BASE_PORT=$DEFAULT_PORT; DIR="$DEFAULT_DIR"; EXTRA_PROPS=(); SASL=0; TLS=0
  while (($#)); do
    case "$1" in
      --nodes) [[ $# -ge 2 ]] || die "--nodes needs a value"; NODES="$2"; shift 2 ;;
      --nodes=*) NODES="${1#--nodes=}"; shift ;;
      --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; DIR="$2"; shift 2 ;;
      --dir=*) DIR="${1#--dir=}"; shift ;;
      --port) [[ $# -ge 2 ]] || die "--port needs a value"; BASE_PORT="$2"; shift 2 ;;
      --port=*) BASE_PORT="${1#--port=}"; shift ;;
      --prop) [[ $# -ge 2 ]] || die "--prop needs key=value"; EXTRA_PROPS+=("$2"); shift 2 ;;
      --prop=*) EXTRA_PROPS+=("${1#--prop=}"); shift ;;
      --sasl) SASL=1; shift ;;
      --tls) TLS=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) die "start: unknown argument '$1'" ;;
    esac
  done
  [[ "$NODES" == 1 || "$NODES" == 3 ]] || die "--nodes must be 1 or 3 (got '$NODES')"
  local span=$((2 * NODES + SASL * NODES + 2 * TLS * NODES + SASL * TLS * NODES))
  if ! [[ "$BASE_PORT" =~ ^[0-9]+$ ]] || ((BASE_PORT < 1024 || BASE_PORT + span > 65535)); then
    die "--port must be a number in 1024..$((65535 - span)) (got '$BASE_PORT')"
  fi
  local p
  for p in "${EXTRA_PROPS[@]+"${EXTRA_PROPS[@]}"}"; do
    [[ "$p" == ?*=* ]] || die "--prop expects key=value (got '$p')"
  done
  DIR="$(abs_dir "$DIR")"
  START_S=$SECONDS

  # Refuse to clobber a running cluster or a directory we did not create.
  if [[ -f "$DIR/cluster.env" ]]; then
    local old_nodes n running=()
    old_nodes="$(sed -n 's/^NODES=//p' "$DIR/cluster.env")"
    NODES_SAVE=$NODES; NODES="${old_nodes:-3}"
    for ((n = 1; n <= NODES; n++)); do [[ -n "$(node_pid "$n")" ]] && running+=("$n"); done
    NODES=$NODES_SAVE
    ((${#running[@]} == 0)) || die "a cluster is already running in $DIR (nodes: ${running[*]}); run '$PROG stop --dir $DIR' first"
  elif [[ -e "$DIR" ]] && [[ -n "$(ls -A "$DIR" 2>/dev/null)" ]]; then
    die "$DIR exists, is not empty and was not created by $PROG; choose another --dir"
  fi

  ensure_libs
  local ports=()
  # shellcheck disable=SC2207
  for ((n = 1; n <= NODES; n++)); do ports+=($(node_ports "$n")); done
  check_ports_free "${ports[@]}"

  rm -rf "$DIR"
  mkdir -p "$DIR"
  CLUSTER_ID="$(random_cluster_id)"
  {
    echo "# written by $PROG start; read by the other subcommands"
    echo "NODES=$NODES"
    echo "BASE_PORT=$BASE_PORT"
    echo "CLUSTER_ID=$CLUSTER_ID"
    printf 'STATE_LIBS=%q\n' "$LIBS"
    echo "KAFKA_VERSION=$(kafka_version)"
    echo "SASL=$SASL"
    echo "TLS=$TLS"
  } >"$DIR/cluster.env"
  if ((TLS)); then make_tls_material; fi

  info "formatting $NODES node(s) in $DIR (cluster id $CLUSTER_ID, Kafka $(kafka_version))"
  local fmt_pids=() nd
  for ((n = 1; n <= NODES; n++)); do
    nd="$(node_dir "$n")"
    mkdir -p "$nd/data"
    write_server_properties "$n"
    local extra=()
    ((NODES == 1)) && extra=(--standalone)
    # SCRAM credentials live in the cluster metadata: written at format time.
    if ((SASL)); then
      extra+=(--add-scram "SCRAM-SHA-256=[name=$SASL_USER,password=$SASL_PASSWORD]"
        --add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]")
    fi
    # shellcheck disable=SC2086
    "$JAVA" $KAFKA_TOOLS_HEAP "-Dlog4j2.configurationFile=$TOOLS_LOG4J" -cp "$LIBS/*" \
      kafka.tools.StorageTool format -t "$CLUSTER_ID" -c "$nd/server.properties" "${extra[@]+"${extra[@]}"}" \
      >"$nd/format.log" 2>&1 &
    fmt_pids+=($!)
  done
  local i failed=0
  for i in "${!fmt_pids[@]}"; do
    if ! wait "${fmt_pids[$i]}"; then
      failed=1
      info "formatting node $((i + 1)) failed:"; cat "$(node_dir $((i + 1)))/format.log" >&2
    fi
  done
  ((failed == 0)) || die "storage format failed"

  declare -g -a LOG_OFFSET=() STARTED_PIDS=()
  local all=()
  for ((n = 1; n <= NODES; n++)); do launch_node "$n"; all+=("$n"); done
  info "started node pid(s) ${STARTED_PIDS[*]}; waiting up to ${START_TIMEOUT}s for \"$READY_LINE\""
  if ! wait_ready "${all[@]}"; then
    info "start failed; stopping the nodes"
    terminate_pids "${STARTED_PIDS[@]}"
    exit 1
  fi
  info "cluster of $NODES node(s) ready in $((SECONDS - START_S))s; logs: $DIR/node*/kafka.log"
  if ((SASL)); then
    info "SASL_PLAINTEXT listeners (user $SASL_USER, password $SASL_PASSWORD): $(bootstrap_servers sasl_port)"
  fi
  if ((TLS)); then info "SSL listeners (CA: $DIR/tls/ca.pem): $(bootstrap_servers tls_port)"; fi
  if ((SASL && TLS)); then info "SASL_SSL listeners (same user and CA): $(bootstrap_servers sasl_ssl_port)"; fi
  if ((TLS)); then
    info "SSL listeners requiring a client certificate (DIR/tls/client.p12, password $TLS_STORE_PASSWORD): $(bootstrap_servers mtls_port)"
  fi
  bootstrap_servers
}

cmd_start_node() {
  [[ $# -ge 1 ]] || die "usage: $PROG start-node N [--dir DIR]"
  local n="$1"; shift
  parse_dir_only "$@"
  ((${#REST[@]} == 0)) || die "start-node: unexpected argument(s): ${REST[*]}"
  load_state
  check_node_number "$n"
  local pid
  pid="$(node_pid "$n")"
  [[ -z "$pid" ]] || die "node $n is already running (pid $pid)"
  # shellcheck disable=SC2046
  check_ports_free $(node_ports "$n")
  START_S=$SECONDS
  declare -g -a LOG_OFFSET=() STARTED_PIDS=()
  launch_node "$n"
  info "started node $n (pid ${STARTED_PIDS[$n]}); waiting up to ${START_TIMEOUT}s for \"$READY_LINE\""
  if ! wait_ready "$n"; then
    terminate_pids "${STARTED_PIDS[$n]}"
    exit 1
  fi
  bootstrap_servers
}

cmd_stop() {
  local clean=0 args=()
  for a in "$@"; do
    if [[ "$a" == --clean ]]; then clean=1; else args+=("$a"); fi
  done
  parse_dir_only "${args[@]+"${args[@]}"}"
  ((${#REST[@]} == 0)) || die "stop: unexpected argument(s): ${REST[*]}"
  if [[ ! -f "$DIR/cluster.env" ]]; then
    info "no cluster in $DIR; nothing to stop"
    return 0
  fi
  read_state
  local n pid pids=()
  for ((n = 1; n <= NODES; n++)); do
    pid="$(node_pid "$n")"
    [[ -n "$pid" ]] && pids+=("$pid")
  done
  if ((${#pids[@]})); then
    info "stopping ${#pids[@]} node(s) (pid ${pids[*]})"
    terminate_pids "${pids[@]}"
  else
    info "no node running in $DIR"
  fi
  for ((n = 1; n <= NODES; n++)); do rm -f "$(node_dir "$n")/kafka.pid"; done
  if ((clean)); then
    rm -rf "$DIR"
    info "removed $DIR"
  fi
}

cmd_kill_node() {
  [[ $# -ge 1 ]] || die "usage: $PROG kill-node N [--dir DIR]"
  local n="$1"; shift
  parse_dir_only "$@"
  ((${#REST[@]} == 0)) || die "kill-node: unexpected argument(s): ${REST[*]}"
  [[ -f "$DIR/cluster.env" ]] || die "no cluster in $DIR"
  read_state
  check_node_number "$n"
  local pid i
  pid="$(node_pid "$n")"
  if [[ -z "$pid" ]]; then
    info "node $n is not running"
    return 0
  fi
  kill -KILL "$pid"
  for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$(node_dir "$n")/kafka.pid"
  info "killed node $n (pid $pid) with SIGKILL"
}

cmd_status() {
  parse_dir_only "$@"
  ((${#REST[@]} == 0)) || die "status: unexpected argument(s): ${REST[*]}"
  if [[ ! -f "$DIR/cluster.env" ]]; then
    echo "no cluster in $DIR"
    return 1
  fi
  read_state
  local n pid up=0
  echo "cluster $CLUSTER_ID in $DIR (Kafka ${KAFKA_VERSION:-?}, $NODES node(s))"
  for ((n = 1; n <= NODES; n++)); do
    pid="$(node_pid "$n")"
    if [[ -n "$pid" ]]; then
      up=$((up + 1))
      echo "node $n: running (pid $pid) broker 127.0.0.1:$(broker_port "$n") controller 127.0.0.1:$(controller_port "$n")"
    else
      echo "node $n: stopped"
    fi
  done
  echo "bootstrap: $(bootstrap_servers)"
  ((up == NODES))
}

cmd_bootstrap() {
  parse_dir_only "$@"
  [[ -f "$DIR/cluster.env" ]] || die "no cluster in $DIR"
  read_state
  case "${REST[*]-}" in
    "") bootstrap_servers ;;
    --sasl)
      ((${SASL:-0})) || die "the cluster in $DIR has no SASL listeners (start it with --sasl)"
      bootstrap_servers sasl_port ;;
    --tls)
      ((${TLS:-0})) || die "the cluster in $DIR has no SSL listeners (start it with --tls)"
      bootstrap_servers tls_port ;;
    --sasl-ssl)
      ((${SASL:-0} && ${TLS:-0})) || die "the cluster in $DIR has no SASL_SSL listeners (start it with --sasl --tls)"
      bootstrap_servers sasl_ssl_port ;;
    --mtls)
      ((${TLS:-0})) || die "the cluster in $DIR has no listeners requiring client certificates (start it with --tls)"
      bootstrap_servers mtls_port ;;
    *) die "bootstrap: unexpected argument(s): ${REST[*]}" ;;
  esac
}

run_tool() {  # run_tool CLASS ARGS...  (DIR already set)
  local class="$1"; shift
  load_state
  local args=("$@") a has_bs=0
  for a in "${args[@]+"${args[@]}"}"; do
    [[ "$a" == --bootstrap-server || "$a" == --bootstrap-server=* || "$a" == --bootstrap-controller* ]] && has_bs=1
  done
  if ((has_bs == 0)) && [[ "$class" != kafka.tools.StorageTool ]]; then
    # Prepended: argparse tools with sub-commands (metadata-quorum, transactions) only accept
    # it before the sub-command; option order does not matter to the others.
    args=(--bootstrap-server "$(bootstrap_servers)" "${args[@]+"${args[@]}"}")
  fi
  # shellcheck disable=SC2086
  exec "$JAVA" $KAFKA_TOOLS_HEAP "-Dlog4j2.configurationFile=$TOOLS_LOG4J" -cp "$LIBS/*" "$class" "${args[@]+"${args[@]}"}"
}

cmd_topics() {
  parse_dir_only "$@"
  run_tool org.apache.kafka.tools.TopicCommand "${REST[@]+"${REST[@]}"}"
}

cmd_tool() {
  [[ $# -ge 1 ]] || die "usage: $PROG tool NAME|CLASS [--dir DIR] -- ARGS (NAME: ${!TOOL_ALIASES[*]})"
  local name="$1" class; shift
  if [[ -n "${TOOL_ALIASES[$name]:-}" ]]; then
    class="${TOOL_ALIASES[$name]}"
  elif [[ "$name" == *.* ]]; then
    class="$name"
  else
    die "unknown tool '$name' (known: ${!TOOL_ALIASES[*]}; or give a fully qualified class name)"
  fi
  parse_dir_only "$@"
  run_tool "$class" "${REST[@]+"${REST[@]}"}"
}

cmd_libs() {
  ensure_libs
  printf '%s\n' "$LIBS"
}

main() {
  (($#)) || { usage; exit 2; }
  local cmd="$1"; shift
  case "$cmd" in
    fetch) cmd_fetch "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    kill-node) cmd_kill_node "$@" ;;
    start-node) cmd_start_node "$@" ;;
    topics) cmd_topics "$@" ;;
    tool) cmd_tool "$@" ;;
    bootstrap) cmd_bootstrap "$@" ;;
    libs) cmd_libs "$@" ;;
    -h|--help|help) usage ;;
    *) die "unknown command '$cmd' (see '$PROG --help')" ;;
  esac
}

main "$@"
