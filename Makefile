# keyissuer. `make run` starts the daemon on a SoftHSM token made inside the
# project; `make test` runs every test, SoftHSM integration tests included.

GO       ?= go
BIN      := bin
PKGS     := ./...
CONFIG   ?= config.example.toml

.PHONY: all build run test lint fmt clean softhsm cluster

all: build

build:
	$(GO) build -trimpath -o $(BIN)/ ./cmd/...

# The dev token: made once, kept in .softhsm/ (git-ignored), with its
# response-signing key, whose public half softhsm-setup.sh writes last.
softhsm: .softhsm/response-signing.pub
.softhsm/response-signing.pub:
	./softhsm-setup.sh

# Runs keyissuerd in the foreground with $(CONFIG) (config.example.toml) on
# the dev token; Ctrl-C stops it cleanly (pooled keys destroyed, records
# marked).
run: export SOFTHSM2_CONF := $(CURDIR)/.softhsm/softhsm2.conf
run: build softhsm
	$(BIN)/keyissuerd -config $(CONFIG)

# HTTPS for development: `make dev-tls` writes a development CA and a
# server certificate for 127.0.0.1 and localhost into .dev-tls/ (git-ignored;
# keys mode 0600), once. `make run-tls` is `make run` with applyPublicKey on
# https://127.0.0.1:8443: $(CONFIG) with api.listen and the certificate
# changed, written to config.tls.toml (git-ignored). curl --cacert
# .dev-tls/ca.pem trusts it.
.PHONY: dev-tls run-tls
dev-tls: .dev-tls/server.pem
.dev-tls/server.pem:
	$(GO) run ./cmd/keyissuer dev-tls -dir .dev-tls

run-tls: export SOFTHSM2_CONF := $(CURDIR)/.softhsm/softhsm2.conf
run-tls: build softhsm dev-tls
	sed -e 's|^listen = "127.0.0.1:8080"$$|listen = "127.0.0.1:8443"\ntls_cert_file = ".dev-tls/server.pem"\ntls_key_file = ".dev-tls/server.key"|' \
		$(CONFIG) > config.tls.toml
	@grep -q '^tls_cert_file' config.tls.toml || { echo "run-tls: $(CONFIG) has no line listen = \"127.0.0.1:8080\" to change"; exit 1; }
	$(BIN)/keyissuerd -config config.tls.toml

# The checkout demo: keyissuerd as `make run` starts it, with the demo
# merchant registered (config.demo.toml, git-ignored; its key, a development
# fixture made here, in .demo/), and keyissuer-demo's checkout page on
# http://127.0.0.1:8090/. The wallet password is "correct horse". Ctrl-C
# stops both.
.PHONY: demo
demo: export SOFTHSM2_CONF := $(CURDIR)/.softhsm/softhsm2.conf
demo: build softhsm
	$(BIN)/keyissuer-demo setup -config $(CONFIG) -dir .demo -out config.demo.toml
	@$(BIN)/keyissuerd -config config.demo.toml & kid=$$!; \
	trap 'kill -TERM $$kid 2>/dev/null; wait $$kid' EXIT; \
	$(BIN)/keyissuer-demo -listen 127.0.0.1:8090 -merchant-key .demo/merchant.pem \
		-server-key .softhsm/response-signing.pub -socket run/decrypt.sock

# A local cluster in the foreground (README, "Cluster"): PostgreSQL on
# 127.0.0.1:55432 with its data in .pgdata/, and three keyissuerd on the dev
# token (apply on 127.0.0.1:8081-8083, admin on 9471-9473, decrypt sockets
# run/cluster/{1,2,3}/decrypt.sock). Ctrl-C stops everything.
cluster: build softhsm
	cmd/keyissuerd/cluster-dev.sh

# Every test with the race detector, then every fuzz target for a few
# seconds (TEST_FUZZTIME; 0 skips it). Integration tests make their own
# SoftHSM tokens in a temp dir (hsm/hsmtest); the dev token is not touched.
# .ci/test-deps first installs the Debian packages the tests use (SoftHSM,
# openCryptoki, PostgreSQL, Chromium, promtool, a JDK...) as root, or says
# how; a test whose component is missing skips, and fails under CI=true.
TEST_FUZZTIME ?= 3s
test:
	@.ci/test-deps
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout 25m $(PKGS)
	@if [ "$(TEST_FUZZTIME)" != 0 ]; then $(MAKE) --no-print-directory fuzz FUZZTIME=$(TEST_FUZZTIME); fi

# The long runs of the reliability suite (RELIABILITY.md); `make test` runs
# their fast parts. `make fuzz` runs every fuzz target (each `func Fuzz...` in
# a _test.go file) for FUZZTIME; `make test` runs their seed corpora (in
# testdata/fuzz) and then each target for TEST_FUZZTIME. A crasher lands
# in its package's testdata/fuzz/<target>/: commit it as a regression seed. `make soak` runs the crash harness for
# SOAK_CYCLES kill-and-restart cycles, SOAK_CYCLES/10 token outages, as many
# kills of one of three cluster instances (PostgreSQL) and
# SOAK_STORMS storms of injected token faults; CRASH_SEED=n replays the
# kills of a logged seed.
FUZZTIME    ?= 1m
FUZZFLAGS   ?=
SOAK_CYCLES ?= 300
SOAK_STORMS ?= 10

# Go 1.26's fuzzing coordinator can fail a target with a bare "context
# deadline exceeded" as -fuzztime runs out, having found nothing
# (golang/go#75804, fixed in Go 1.27). Such a run, with no failing input
# written, is tried again, at most twice; any other failure fails at once.
.PHONY: fuzz soak
fuzz:
	@set -e; out=$$(mktemp); trap 'rm -f "$$out"' EXIT; \
	for file in $$(grep -rl --include='*_test.go' --exclude-dir=.git '^func Fuzz' .); do \
		for target in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' $$file); do \
			for try in 1 2 3; do \
				echo "+ $(GO) test -run='^$$' -fuzz='^$$target\$$' -fuzztime=$(FUZZTIME) $(FUZZFLAGS) $$(dirname $$file)"; \
				if $(GO) test -run='^$$' -fuzz="^$$target\$$" -fuzztime=$(FUZZTIME) $(FUZZFLAGS) $$(dirname $$file) >"$$out" 2>&1; then \
					cat "$$out"; break; \
				fi; \
				cat "$$out"; \
				if [ $$try -lt 3 ] && grep -q '^    context deadline exceeded$$' "$$out" && ! grep -q 'Failing input written to' "$$out"; then \
					echo "($$target: Go's fuzzing coordinator timed itself out, golang/go#75804; no input failed; again)"; \
				else \
					exit 1; \
				fi; \
			done; \
		done; \
	done

soak:
	@command -v softhsm2-util >/dev/null || ./softhsm-setup.sh
	SOAK_CYCLES=$(SOAK_CYCLES) $(GO) test -race -count=1 -timeout 0 -v \
		-run '^(TestCrashCycles|TestTokenOutage|TestClusterKillCycles)$$' ./server/daemon/reliability/
	$(GO) test -race -count=$(SOAK_STORMS) -v -run '^TestIssuerUnderTokenFaults$$' ./issuer/

# `make bench` measures keyissuer against the token's own limits, each
# comparison side by side in one run (cmd/keyissuer-bench; BENCHMARKS.md):
# a fresh SoftHSM token in a temp dir, real keyissuerd processes, a table on
# stdout and bench-results/<time>.json. About 12 minutes at BENCH_SCALE=1 on
# 2 cores, most of it SoftHSM filling key pools, untimed; BENCH_SCALE=0.3 is
# a quick look, 3 a steadier one. `make bench-micro` runs the Go
# micro-benchmarks of the hot functions.
BENCH_SCALE ?= 1

.PHONY: bench bench-micro
bench:
	@command -v softhsm2-util >/dev/null || ./softhsm-setup.sh
	$(GO) build -trimpath -o $(BIN)/ ./cmd/keyissuerd ./cmd/keyissuer-bench
	$(GO) build -trimpath -tags pprof -o $(BIN)/keyissuerd-pprof ./cmd/keyissuerd
	$(BIN)/keyissuer-bench -scale $(BENCH_SCALE) -keyissuerd $(BIN)/keyissuerd \
		-keyissuerd-pprof $(BIN)/keyissuerd-pprof -out bench-results

bench-micro:
	$(GO) test -run '^$$' -bench . -benchmem ./hsm/rsapad ./issuer/store ./server/...

lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet $(PKGS)

fmt:
	gofmt -w $$(git ls-files '*.go')

# Removes builds and the local run state. The dev token stays; remove it with
# `rm -rf .softhsm`.
clean:
	rm -rf $(BIN) data run

# Installs the binaries, the systemd unit (with its sandbox), the service
# user, logrotate for the audit trail, a host config (kept if present) and
# the docs. DESTDIR stages a package; PREFIX is where binaries go. Then, on
# the host: systemd-sysusers; edit /etc/keyissuer/config.toml and the PIN
# file; systemctl enable --now keyissuerd. See OPERATIONS.md.
PREFIX     ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR    ?= $(PREFIX)/lib/systemd/system
DEPLOY     := cmd/keyissuerd/deploy

.PHONY: install
install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PREFIX)/lib/sysusers.d \
		$(DESTDIR)$(SYSCONFDIR)/logrotate.d $(DESTDIR)$(PREFIX)/share/doc/keyissuer
	install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/keyissuer
	install -m 0755 $(BIN)/keyissuerd $(BIN)/keyissuer $(DESTDIR)$(PREFIX)/bin/
	sed -e 's#/usr/local/bin/#$(PREFIX)/bin/#g' -e 's#/usr/local/share/#$(PREFIX)/share/#g' \
		-e 's#/etc/keyissuer/#$(SYSCONFDIR)/keyissuer/#g' $(DEPLOY)/keyissuerd.service > $(DESTDIR)$(UNITDIR)/keyissuerd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/keyissuerd.service
	install -m 0644 $(DEPLOY)/sysusers.conf $(DESTDIR)$(PREFIX)/lib/sysusers.d/keyissuer.conf
	install -m 0644 $(DEPLOY)/logrotate.conf $(DESTDIR)$(SYSCONFDIR)/logrotate.d/keyissuer
	test -e $(DESTDIR)$(SYSCONFDIR)/keyissuer/config.toml || \
		install -m 0640 $(DEPLOY)/config.toml $(DESTDIR)$(SYSCONFDIR)/keyissuer/config.toml
	install -m 0644 README.md OPERATIONS.md config.example.toml $(DESTDIR)$(PREFIX)/share/doc/keyissuer/
	@if command -v systemd-analyze >/dev/null && [ -z "$(DESTDIR)" ]; then \
		systemd-analyze verify $(UNITDIR)/keyissuerd.service; fi
