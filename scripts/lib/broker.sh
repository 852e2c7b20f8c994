# shellcheck shell=bash
# scripts/lib/broker.sh: private RabbitMQ nodes and throw-away test material for fm's tests.
#
# Sourced by scripts/test (the CI entry point) and scripts/broker (the developer CLI). Why it exists:
# fm is tested against a real RabbitMQ, never a mock, and a test run must neither depend on nor disturb
# the machine's own broker. So every node started here is private:
#   - its own Erlang node name (fm-NAME@localhost) and free ports (AMQP, AMQPS, Erlang distribution);
#   - its own config, enabled-plugins file, data (mnesia), logs and pid file, all in one folder,
#     $FM_NODES/NAME/, owned by the `rabbitmq` user because Debian's wrappers in /usr/sbin drop to it;
#   - its own server certificate copy, with TLS client verification and SASL EXTERNAL enabled.
# A node's ports and data are kept in that folder, so `broker_stop NAME; broker_start NAME` restarts
# the same node (durable queues survive), which is how tests simulate a broker restart.
#
# The Erlang cookie: as root, Debian's /usr/sbin/rabbitmq-server and /usr/sbin/rabbitmqctl both `su`
# to the rabbitmq user (HOME=/var/lib/rabbitmq), so the node and every CLI call share
# /var/lib/rabbitmq/.erlang.cookie; nothing in root's home is needed. As another user the scripts in
# /usr/lib/rabbitmq/bin run directly under that user's own ~/.erlang.cookie.
#
# Functions (progress goes to stderr; stdout carries only values such as broker_env's lines):
#   fm_ensure_packages         apt-get install what the tests need, only when something is missing
#   fm_ensure_packages_of PKG… the same for other packages (scripts/rpm, scripts/wheel)
#   fm_ensure_venv             target/venv with fedora-messaging (reused when present)
#   fm_ensure_pki              target/test-pki (see fm_make_pki for the files)
#   broker_start NAME          start node NAME (first start: allocate ports, create fm-client user)
#   broker_stop NAME           stop node NAME, then kill what is left of that node only
#   broker_destroy NAME        stop and delete the node's folder
#   broker_running NAME        exit status 0 when the node's Erlang VM is alive
#   broker_env NAME            eval-able `export FM_TEST_...=...` lines for the node
#   broker_ctl NAME ARGS...    rabbitmqctl against the node
#   broker_join NAME SEED      cluster node NAME with node SEED
#   broker_gc                  remove nodes left behind by dead test runs (owner.pid)

FM_ROOT=${FM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
FM_TARGET=$FM_ROOT/target
FM_PKI=$FM_TARGET/test-pki
FM_VENV=$FM_TARGET/venv
FM_FEDORA_MESSAGING_VERSION=3.9.1
# Bump when fm_make_pki changes, so existing material is regenerated.
FM_PKI_VERSION=1
FM_PACKAGES=(rabbitmq-server amqp-tools python3-venv openssl groff-base systemd man-db dpkg-dev pkgconf)
# The CLI tools pick their own distribution port in this range (Debian's default allows only 11,
# too few when tests run rabbitmqctl in parallel). Node ports are allocated outside it.
FM_CTL_DIST_MIN=35672
FM_CTL_DIST_MAX=35799

fm_phase() { printf '==> %s\n' "$*" >&2; }
fm_info() { printf '    %s\n' "$*" >&2; }
fm_die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}

fm_python() {
	if [[ -x /usr/bin/python3 ]]; then echo /usr/bin/python3; else command -v python3; fi
}

fm_is_root() { [[ $(id -u) == 0 ]]; }

# Serialises the setup steps between concurrent runs (two scripts/test, or scripts/test and
# scripts/broker): they share target/venv and target/test-pki.
fm_lock() {
	mkdir -p "$FM_TARGET"
	exec {FM_LOCK_FD}>"$FM_TARGET/.fm-setup.lock"
	flock "$FM_LOCK_FD"
}
fm_unlock() {
	[[ -n ${FM_LOCK_FD:-} ]] || return 0
	flock -u "$FM_LOCK_FD"
	exec {FM_LOCK_FD}>&-
	FM_LOCK_FD=
}

fm_ensure_packages() { fm_ensure_packages_of "${FM_PACKAGES[@]}"; }

fm_ensure_packages_of() {
	local p missing=()
	for p in "$@"; do
		[[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
	done
	command -v cc >/dev/null || missing+=(gcc)
	if ((${#missing[@]} == 0)); then
		fm_phase "packages: all present"
		return 0
	fi
	fm_is_root || fm_die "missing packages: ${missing[*]}; install them: sudo apt-get install -y ${missing[*]}"
	fm_phase "packages: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2 || fm_die "apt-get update failed"
	apt-get install -y -qq "${missing[@]}" </dev/null >&2 || fm_die "apt-get install ${missing[*]} failed"
	# Debian's postinst may start the machine's own node; it is left alone (our nodes never use its
	# name or ports).
}

fm_ensure_venv() {
	local stamp=$FM_VENV/.fm-fedora-messaging
	if [[ -x $FM_VENV/bin/python && -f $stamp && $(<"$stamp") == "$FM_FEDORA_MESSAGING_VERSION" ]]; then
		fm_phase "venv: reusing $FM_VENV (fedora-messaging $FM_FEDORA_MESSAGING_VERSION)"
		return 0
	fi
	fm_phase "venv: creating $FM_VENV with fedora-messaging==$FM_FEDORA_MESSAGING_VERSION"
	rm -rf "$FM_VENV"
	"$(fm_python)" -m venv "$FM_VENV" >&2 || fm_die "python3 -m venv $FM_VENV failed (is python3-venv installed?)"
	"$FM_VENV/bin/pip" install --quiet --disable-pip-version-check \
		"fedora-messaging==$FM_FEDORA_MESSAGING_VERSION" </dev/null >&2 ||
		fm_die "pip install fedora-messaging==$FM_FEDORA_MESSAGING_VERSION into $FM_VENV failed"
	"$FM_VENV/bin/python" -c 'import fedora_messaging.api' ||
		fm_die "fedora_messaging does not import from $FM_VENV"
	echo "$FM_FEDORA_MESSAGING_VERSION" >"$stamp"
}

# ---------------------------------------------------------------------------------------------------
# TLS material. Generated at test time, never committed, valid for 30 days, regenerated when it
# expires within a day or FM_PKI_VERSION changes. Every certificate is X.509 v3 (OpenSSL 3.0's
# `x509 -req` makes v1 certificates unless given extensions, and rustls rejects v1 with a misleading
# UnsupportedCertVersion). Files in $FM_PKI:
#   ca.pem ca.key                 the CA the test nodes trust and whose server certificate tests trust
#   server.pem server.key         CN=localhost, SAN DNS:localhost, IP:127.0.0.1, IP:::1 (copied into nodes)
#   client.pem client.key         CN=fm-client (the RabbitMQ user for EXTERNAL), PKCS#8 RSA key
#   client-pkcs1.key              the same key as PKCS#1 ("BEGIN RSA PRIVATE KEY"), for client.pem
#   client-ec.pem client-ec.key   CN=fm-client with a P-256 key in SEC1 form ("BEGIN EC PRIVATE KEY")
#   other-ca.pem other-ca.key     an unrelated CA
#   other-client.pem .key         CN=fm-client signed by the unrelated CA (the node must refuse it)
#   expired-client.pem .key       CN=fm-client signed by ca.pem, valid 2020-01-01..2020-01-02 only
#   stranger.pem stranger.key     CN=fm-stranger signed by ca.pem: valid TLS, but no such RabbitMQ user
# A name mismatch needs no extra certificate: connect to amqps://127.0.0.2:PORT (not in the SAN).

fm_pki_fresh() {
	local f
	[[ -f $FM_PKI/.version && $(<"$FM_PKI/.version") == "$FM_PKI_VERSION" ]] || return 1
	for f in ca server client client-ec other-ca other-client stranger; do
		openssl x509 -noout -checkend 86400 -in "$FM_PKI/$f.pem" >/dev/null 2>&1 || return 1
	done
	[[ -f $FM_PKI/expired-client.pem && -f $FM_PKI/client-pkcs1.key ]]
}

fm_ensure_pki() {
	if fm_pki_fresh; then
		fm_phase "pki: reusing $FM_PKI"
		return 0
	fi
	fm_phase "pki: generating throw-away CA and certificates in $FM_PKI"
	local tmp=$FM_PKI.tmp.$$
	rm -rf "$tmp"
	mkdir -p "$tmp"
	# A separate bash, so `set -e` holds inside (it is ignored in a function called from `||`).
	bash -c 'set -e; . "$0"; fm_make_pki "$1"' "${BASH_SOURCE[0]}" "$tmp" || {
		rm -rf "$tmp"
		fm_die "generating TLS material failed (see the openssl output above)"
	}
	rm -rf "$FM_PKI"
	mv "$tmp" "$FM_PKI"
}

fm_make_pki() {
	local d=$1
	umask 077
	cd "$d" || return 1
	cat >openssl.cnf <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ec]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
# `openssl ca` is only used for the expired certificate: OpenSSL 3.0's `x509` cannot backdate.
[ca]
default_ca = backdating_ca
[backdating_ca]
database = ./ca-db/index.txt
new_certs_dir = ./ca-db
serial = ./ca-db/serial
default_md = sha256
policy = any_policy
unique_subject = no
[any_policy]
commonName = supplied
EOF
	local q=(-config openssl.cnf)
	rsa() { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null; }
	ca() { # NAME CN
		rsa "$1.key"
		openssl req "${q[@]}" -x509 -new -key "$1.key" -subj "/O=fm tests/CN=$2" -days 30 -sha256 \
			-extensions v3_ca -out "$1.pem"
	}
	leaf() { # NAME CN CA EXTENSIONS (the key NAME.key exists)
		openssl req "${q[@]}" -new -key "$1.key" -subj "/O=fm tests/CN=$2" -out "$1.csr"
		openssl x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3.key" -set_serial "0x$(openssl rand -hex 16)" \
			-days 30 -sha256 -extfile openssl.cnf -extensions "$4" -out "$1.pem" 2>/dev/null
		rm "$1.csr"
	}
	ca ca "fm test CA"
	rsa server.key && leaf server localhost ca server
	rsa client.key && leaf client fm-client ca client
	openssl rsa -in client.key -traditional -out client-pkcs1.key 2>/dev/null
	openssl ecparam -name prime256v1 -genkey -noout -out client-ec.key
	leaf client-ec fm-client ca client_ec
	ca other-ca "fm unrelated test CA"
	rsa other-client.key && leaf other-client fm-client other-ca client
	rsa stranger.key && leaf stranger fm-stranger ca client
	rsa expired-client.key
	openssl req "${q[@]}" -new -key expired-client.key -subj "/O=fm tests/CN=fm-client" -out expired-client.csr
	mkdir ca-db && : >ca-db/index.txt && openssl rand -hex 16 >ca-db/serial
	openssl ca "${q[@]}" -batch -notext -cert ca.pem -keyfile ca.key -in expired-client.csr \
		-startdate 20200101000000Z -enddate 20200102000000Z -extensions client -out expired-client.pem 2>/dev/null
	rm -rf ca-db expired-client.csr
	# Sanity: the properties the tests rely on.
	grep -q 'BEGIN PRIVATE KEY' client.key
	grep -q 'BEGIN RSA PRIVATE KEY' client-pkcs1.key
	grep -q 'BEGIN EC PRIVATE KEY' client-ec.key
	for f in *.pem; do
		openssl x509 -in "$f" -noout -text | grep 'Version: 3 (0x2)' >/dev/null || {
			echo "$f is not an X.509 v3 certificate" >&2
			return 1
		}
	done
	openssl verify -CAfile ca.pem server.pem client.pem client-ec.pem stranger.pem >/dev/null
	openssl verify -CAfile other-ca.pem other-client.pem >/dev/null
	! openssl verify -CAfile ca.pem expired-client.pem >/dev/null 2>&1
	# Readable by the tests (a user other than root may run cargo test); nothing here is secret.
	chmod 644 ./*.pem ./*.key
	echo "$FM_PKI_VERSION" >.version
}

# ---------------------------------------------------------------------------------------------------
# Nodes.

# Where node folders live. The rabbitmq user must be able to reach them; when the work tree sits
# somewhere it cannot (say under /root), use a folder in /var/tmp named after the work tree instead.
fm_nodes_dir() {
	if [[ -n ${FM_NODES:-} ]]; then
		echo "$FM_NODES"
		return
	fi
	local dir=$FM_TARGET/rabbitmq
	mkdir -p "$dir"
	if fm_is_root && ! runuser -u rabbitmq -- test -x "$dir" 2>/dev/null; then
		dir=/var/tmp/fm-rabbitmq-$(printf '%s' "$FM_ROOT" | md5sum | cut -c1-12)
		mkdir -p "$dir"
		chmod 755 "$dir"
	fi
	FM_NODES=$dir
	echo "$dir"
}

fm_check_name() {
	[[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] || fm_die "bad node name '$1': use letters, digits, '-' and '_'"
}

fm_node_dir() { echo "$(fm_nodes_dir)/$1"; }

# The Debian wrappers (root or rabbitmq) or the real scripts (any other user, own cookie).
fm_rmq_bin() {
	if fm_is_root || [[ $(id -un) == rabbitmq ]]; then echo "/usr/sbin/$1"; else echo "/usr/lib/rabbitmq/bin/$1"; fi
}

# fm_free_ports N [RESERVED...]: N distinct TCP ports free on all interfaces (IPv4 and IPv6), from
# 20000..32000: below Linux's ephemeral range (so outgoing connections do not take them between
# this check and the node's bind), away from RabbitMQ's defaults and the CLI range, and not
# reserved by another node folder (a stopped node keeps its ports for its restart).
fm_free_ports() {
	"$(fm_python)" - "$@" <<'EOF'
import errno, random, socket, sys
n = int(sys.argv[1])
avoid = {4369, 5671, 5672, 15672, 25672} | {int(p) for p in sys.argv[2:]}
def free(port):
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this machine
        try:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                return False
        finally:
            s.close()
    return True
found = []
for _ in range(10000):
    p = random.randint(20000, 32000)
    if p not in avoid and p not in found and free(p):
        found.append(p)
        if len(found) == n:
            print(" ".join(map(str, found)))
            sys.exit(0)
sys.exit("no free TCP ports found in 20000..32000")
EOF
}

# Ports reserved by existing node folders.
fm_reserved_ports() {
	local f
	for f in "$(fm_nodes_dir)"/*/node.env; do
		[[ -f $f ]] || continue
		(
			# shellcheck source=/dev/null
			. "$f"
			echo "$AMQP_PORT $AMQPS_PORT $DIST_PORT"
		)
	done
}

# Reads node.env of NAME into the caller's (local) NODE AMQP_PORT AMQPS_PORT DIST_PORT.
fm_load_node() {
	local f
	f=$(fm_node_dir "$1")/node.env
	[[ -f $f ]] || fm_die "no node '$1' (no $f): start it with scripts/broker start $1"
	# shellcheck source=/dev/null
	. "$f"
}

broker_ctl() {
	local name=$1 dir
	shift
	dir=$(fm_node_dir "$name")
	[[ -x $dir/rabbitmqctl ]] || fm_die "no node '$name' (no $dir/rabbitmqctl)"
	"$dir/rabbitmqctl" "$@"
}

# The Erlang VM's pid when node NAME runs, else nothing (status 1). Checked through /proc, no CLI:
# the pid file must name a live process whose environment carries this node's name (the command
# line does not: RabbitMQ 3.10 names its node at boot, from RABBITMQ_NODENAME).
fm_beam_pid() {
	local dir pid
	dir=$(fm_node_dir "$1")
	[[ -s $dir/rabbitmq.pid ]] || return 1
	pid=$(<"$dir/rabbitmq.pid")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	fm_pid_has_env "$pid" "RABBITMQ_NODENAME=fm-$1@localhost" || return 1
	echo "$pid"
}

fm_pid_has_env() { # PID VAR=VALUE
	# Not grep -q: it could stop reading early and, under pipefail, tr's SIGPIPE would read as "no".
	{ tr '\0' '\n' <"/proc/$1/environ"; } 2>/dev/null | grep -xF -- "$2" >/dev/null
}

# A process that exists and is not a zombie (an exited launcher waits a moment for init to reap it).
fm_alive() {
	local line
	{ read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
	line=${line##*) }
	[[ ${line:0:1} != Z ]]
}

broker_running() { fm_beam_pid "$1" >/dev/null; }

fm_write_node_files() { # NAME
	local name=$1 dir node
	dir=$(fm_node_dir "$name")
	local NODE AMQP_PORT AMQPS_PORT DIST_PORT
	fm_load_node "$name"
	mkdir -p "$dir/mnesia" "$dir/log" "$dir/tls"
	cp "$FM_PKI/ca.pem" "$FM_PKI/server.pem" "$FM_PKI/server.key" "$dir/tls/"
	chmod 600 "$dir/tls/server.key"
	cat >"$dir/rabbitmq.conf" <<EOF
# Generated by scripts/lib/broker.sh for $NODE; rewritten at every start.
listeners.tcp.default = $AMQP_PORT
listeners.ssl.default = $AMQPS_PORT
ssl_options.cacertfile = $dir/tls/ca.pem
ssl_options.certfile = $dir/tls/server.pem
ssl_options.keyfile = $dir/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
ssl_cert_login_from = common_name
loopback_users = none
log.console = false
log.file.level = info
# Test machines can be short of disk; the default 50MB alarm would block publishers.
disk_free_limit.absolute = 8MB
EOF
	# rabbitmq_auth_mechanism_ssl provides EXTERNAL; the management plugin stays off (slow start).
	echo '[rabbitmq_auth_mechanism_ssl].' >"$dir/enabled_plugins"
	# Empty: keeps /etc/rabbitmq/rabbitmq-env.conf and advanced.config out of our nodes.
	: >"$dir/rabbitmq-env.conf"
	cat >"$dir/rabbitmqctl" <<EOF
#!/bin/sh
# rabbitmqctl for the test node $NODE (generated by scripts/lib/broker.sh).
RABBITMQ_CTL_DIST_PORT_MIN=$FM_CTL_DIST_MIN RABBITMQ_CTL_DIST_PORT_MAX=$FM_CTL_DIST_MAX
RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf
export RABBITMQ_CTL_DIST_PORT_MIN RABBITMQ_CTL_DIST_PORT_MAX RABBITMQ_CONF_ENV_FILE
exec $(fm_rmq_bin rabbitmqctl) -n $NODE "\$@"
EOF
	chmod 755 "$dir/rabbitmqctl"
	if fm_is_root; then
		chown -R rabbitmq:rabbitmq "$dir"
		chmod 755 "$dir"
	fi
}

# Creates the node's folder with its node.env: free ports, chosen under a lock so nodes started in
# parallel never pick the same one.
fm_allocate_node() {
	local name=$1 dir fd ports reserved amqp amqps dist
	dir=$(fm_node_dir "$name")
	exec {fd}>"$(fm_nodes_dir)/.ports.lock"
	flock "$fd"
	reserved=$(fm_reserved_ports)
	# shellcheck disable=SC2086
	ports=$(fm_free_ports 3 $reserved) || fm_die "cannot find free ports for fm-$name@localhost"
	mkdir -p "$dir"
	read -r amqp amqps dist <<<"$ports"
	printf 'NODE=%s\nAMQP_PORT=%s\nAMQPS_PORT=%s\nDIST_PORT=%s\n' "fm-$name@localhost" "$amqp" "$amqps" "$dist" \
		>"$dir/node.env.tmp"
	mv "$dir/node.env.tmp" "$dir/node.env"
	if [[ -n ${FM_TEST_OWNER_PID:-} ]]; then echo "$FM_TEST_OWNER_PID" >"$dir/owner.pid"; fi
	exec {fd}>&-
}

# The Erlang cookie every node and CLI call of this user shares (see the top of this file). Erlang
# creates it on first use, but two nodes booting at once on a fresh machine would race to do so.
fm_ensure_cookie() {
	local home cookie fd
	if fm_is_root; then home=$(getent passwd rabbitmq | cut -d: -f6); else home=$HOME; fi
	cookie=${home:?no home folder for the cookie}/.erlang.cookie
	[[ -s $cookie ]] && return 0
	exec {fd}>"$(fm_nodes_dir)/.ports.lock"
	flock "$fd"
	if [[ ! -s $cookie ]]; then
		(umask 077 && printf '%s' "$(openssl rand -hex 16)" >"$cookie")
		chmod 400 "$cookie"
		if fm_is_root; then chown rabbitmq:rabbitmq "$cookie"; fi
	fi
	exec {fd}>&-
}

# Per-node lock, so two callers (a test restarting the node, a developer) never start or stop the
# same node at once. Released when the command ends.
fm_with_node_lock() { # NAME COMMAND ARGS...
	local name=$1 fd rc
	fm_check_name "$name"
	exec {fd}>"$(fm_nodes_dir)/.$name.lock"
	flock "$fd"
	# Not `|| rc=$?`: that would switch off `set -e` inside the command.
	"${@:2}"
	rc=$?
	exec {fd}>&-
	return "$rc"
}

broker_start() { fm_with_node_lock "${1:?broker_start NAME}" fm_start_node "$1"; }
broker_stop() { fm_with_node_lock "${1:?broker_stop NAME}" fm_stop_node "$1"; }
broker_destroy() { fm_with_node_lock "${1:?broker_destroy NAME}" fm_destroy_node "$1"; }

fm_start_node() {
	local name=$1
	local dir node t0=$SECONDS
	dir=$(fm_node_dir "$name")
	node=fm-$name@localhost
	if broker_running "$name"; then
		fm_phase "broker: $node already running"
		return 0
	fi
	[[ -f $FM_PKI/server.pem ]] || fm_die "no TLS material in $FM_PKI: run fm_ensure_pki first"
	fm_ensure_cookie
	[[ -f $dir/node.env ]] || fm_allocate_node "$name"
	local NODE AMQP_PORT AMQPS_PORT DIST_PORT
	fm_load_node "$name"
	fm_write_node_files "$name"
	rm -f "$dir/rabbitmq.pid"
	fm_phase "broker: starting $node (amqp $AMQP_PORT, amqps $AMQPS_PORT, dist $DIST_PORT, in $dir)"
	# setsid: the node leaves the caller's session, so it outlives the caller (a test restarts its
	# node through scripts/broker) and no terminal signal reaches it. The standard streams are
	# redirected and other descriptors closed, so the node holds no caller's pipe or lock open.
	(
		unset NOTIFY_SOCKET RABBITMQ_ALLOW_INPUT
		for fd in "/proc/$BASHPID/fd"/*; do
			fd=${fd##*/}
			((fd > 2)) && eval "exec $fd>&-" 2>/dev/null
		done
		export RABBITMQ_NODENAME=$NODE RABBITMQ_USE_LONGNAME=false \
			RABBITMQ_NODE_PORT=$AMQP_PORT RABBITMQ_DIST_PORT=$DIST_PORT \
			RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf RABBITMQ_ADVANCED_CONFIG_FILE=$dir/advanced.config \
			RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins \
			RABBITMQ_MNESIA_BASE=$dir/mnesia RABBITMQ_LOG_BASE=$dir/log RABBITMQ_PID_FILE=$dir/rabbitmq.pid
		cd /
		exec setsid "$(fm_rmq_bin rabbitmq-server)" </dev/null >>"$dir/log/console.log" 2>&1
	) &
	echo $! >"$dir/launcher.pid"
	# Wait for the boot to finish: await_startup fails at once while the node is not yet reachable
	# and blocks while it boots. Give up when the launcher dies (a bad config, a taken port).
	local deadline=$((SECONDS + ${FM_BROKER_START_TIMEOUT:-90}))
	until broker_ctl "$name" -q await_startup --timeout 30 >/dev/null 2>&1; do
		if ! fm_alive "$(<"$dir/launcher.pid")"; then
			fm_node_log_tail "$name"
			fm_die "node $node exited during start (logs: $dir/log)"
		fi
		if ((SECONDS >= deadline)); then
			fm_node_log_tail "$name"
			fm_stop_node "$name"
			fm_die "node $node did not start within ${FM_BROKER_START_TIMEOUT:-90}s (logs: $dir/log)"
		fi
		sleep 0.5
	done
	if [[ ! -f $dir/users.done ]]; then
		# fm-client authenticates with its certificate (EXTERNAL, CN=fm-client): it gets a random
		# password that is cleared at once, so PLAIN can never log it in.
		if ! { broker_ctl "$name" -q add_user fm-client "$(openssl rand -hex 16)" &&
			broker_ctl "$name" -q clear_password fm-client &&
			broker_ctl "$name" -q set_permissions -p / fm-client '.*' '.*' '.*'; } >/dev/null; then
			fm_die "creating the fm-client user on $node failed"
		fi
		touch "$dir/users.done"
	fi
	fm_info "$node up in $((SECONDS - t0))s"
}

fm_node_log_tail() {
	local dir f
	dir=$(fm_node_dir "$1")
	for f in "$dir/log/console.log" "$dir/log/fm-$1@localhost.log"; do
		[[ -s $f ]] || continue
		echo "---- last lines of $f" >&2
		tail -n 25 "$f" >&2
	done
}

# Prints PID and all its descendants (from /proc; procps may be missing on a minimal machine).
fm_proc_tree() {
	local f line rest pid
	local -A kids=()
	for f in /proc/[0-9]*/stat; do
		read -r line <"$f" 2>/dev/null || continue
		rest=${line##*) } # fields after "pid (comm) ": state ppid ...
		read -r _ pid _ <<<"$rest"
		f=${f#/proc/}
		kids[$pid]+=" ${f%/stat}"
	done
	local queue=("$@") out=()
	while ((${#queue[@]})); do
		pid=${queue[0]}
		queue=("${queue[@]:1}")
		out+=("$pid")
		# shellcheck disable=SC2206
		queue+=(${kids[$pid]:-})
	done
	echo "${out[@]}"
}

# Kills whatever is left of node NAME, and nothing else: the launcher (when it still is Debian's
# rabbitmq-server wrapper started with this node's environment), the Erlang VM (when its
# environment names this node) and their descendants. A process tree, not a process group: `su`
# puts the node in a session of its own, and Erlang's helpers make their own too.
fm_kill_node_processes() {
	local name=$1 dir launcher beam roots=() pids sig p i alive
	dir=$(fm_node_dir "$name")
	launcher=$(cat "$dir/launcher.pid" 2>/dev/null || true)
	if [[ $launcher =~ ^[0-9]+$ ]] && fm_pid_has_env "$launcher" "RABBITMQ_NODENAME=fm-$name@localhost"; then
		roots+=("$launcher")
	fi
	beam=$(fm_beam_pid "$name" || true)
	[[ -n $beam ]] && roots+=("$beam")
	if ((${#roots[@]})); then
		read -ra pids <<<"$(fm_proc_tree "${roots[@]}")"
		for sig in TERM KILL; do
			kill "-$sig" "${pids[@]}" 2>/dev/null || true
			for i in {1..50}; do
				alive=
				for p in "${pids[@]}"; do fm_alive "$p" && alive=1; done
				[[ -z $alive ]] && break 2
				sleep 0.1
			done
		done
	fi
	rm -f "$dir/launcher.pid"
}

fm_stop_node() {
	local name=$1 dir
	dir=$(fm_node_dir "$name")
	[[ -d $dir ]] || return 0
	if broker_running "$name"; then
		fm_phase "broker: stopping fm-$name@localhost"
		# `stop PIDFILE` returns once the VM has exited; bounded in case the node hangs.
		timeout 60 "$dir/rabbitmqctl" -q stop "$dir/rabbitmq.pid" >/dev/null 2>&1 || true
	fi
	fm_kill_node_processes "$name"
}

fm_destroy_node() {
	local name=$1
	fm_stop_node "$name"
	rm -rf "$(fm_node_dir "$name")" "$(fm_nodes_dir)/.$name.lock"
}

# broker_join NAME SEED: makes node NAME a member of SEED's cluster (both running).
broker_join() {
	local name=${1:?broker_join NAME SEED} seed=${2:?broker_join NAME SEED}
	fm_phase "broker: joining fm-$name@localhost to the cluster of fm-$seed@localhost"
	if ! { broker_ctl "$name" -q stop_app &&
		broker_ctl "$name" -q join_cluster "fm-$seed@localhost" &&
		broker_ctl "$name" -q start_app; } >/dev/null; then
		fm_die "fm-$name@localhost could not join fm-$seed@localhost"
	fi
}

# The environment a test needs for node NAME, as eval-able lines. Values are single-quoted and never
# contain a single quote (paths under the work tree; checked), so tests can parse them too.
broker_env() {
	local name=${1:?broker_env NAME} dir
	dir=$(fm_node_dir "$name")
	local NODE AMQP_PORT AMQPS_PORT DIST_PORT
	fm_load_node "$name"
	local -a kv=(
		FM_TEST_AMQP_URL "amqp://guest:guest@localhost:$AMQP_PORT/%2F"
		FM_TEST_AMQPS_URL "amqps://localhost:$AMQPS_PORT/%2F"
		FM_TEST_AMQP_PORT "$AMQP_PORT"
		FM_TEST_AMQPS_PORT "$AMQPS_PORT"
		FM_TEST_PKI "$FM_PKI"
		FM_TEST_NODE "$NODE"
		FM_TEST_RABBITMQCTL "$dir/rabbitmqctl"
		FM_TEST_VENV "$FM_VENV"
		FM_TEST_BROKER_CTL "$FM_ROOT/scripts/broker"
		FM_TEST_BROKER_NAME "$name"
	)
	local i
	for ((i = 0; i < ${#kv[@]}; i += 2)); do
		[[ ${kv[i + 1]} != *"'"* ]] || fm_die "value of ${kv[i]} contains a single quote: ${kv[i + 1]}"
		printf "export %s='%s'\n" "${kv[i]}" "${kv[i + 1]}"
	done
}

# Removes nodes whose owner is gone: a scripts/test run or a test process that started an extra
# node, killed with SIGKILL, machine rebooted... Developer nodes (no owner.pid) are never touched.
broker_gc() {
	local d name owner
	for d in "$(fm_nodes_dir)"/*/; do
		d=${d%/}
		[[ -d $d ]] || continue
		name=${d##*/}
		owner=$(cat "$d/owner.pid" 2>/dev/null || true)
		[[ $owner =~ ^[0-9]+$ ]] || continue
		kill -0 "$owner" 2>/dev/null && continue
		fm_info "removing node $name left by a dead test run (pid $owner)"
		broker_destroy "$name"
	done
}

# Every node whose name is PREFIX or starts with PREFIX- (a run's own nodes: main, cluster, extras).
broker_names_with_prefix() {
	local d name
	for d in "$(fm_nodes_dir)/$1" "$(fm_nodes_dir)/$1"-*; do
		[[ -d $d ]] || continue
		name=${d##*/}
		echo "$name"
	done
}
