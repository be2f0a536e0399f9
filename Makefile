# keyissuer. `make run` starts the daemon on a SoftHSM token made inside the
# project; `make test` runs every test, SoftHSM integration tests included.

GO       ?= go
BIN      := bin
PKGS     := ./...
CONFIG   ?= config.example.toml

.PHONY: all build run test lint fmt clean softhsm

all: build

build:
	$(GO) build -trimpath -o $(BIN)/ ./cmd/...

# The dev token: made once, kept in .softhsm/ (git-ignored).
softhsm: .softhsm/user.pin
.softhsm/user.pin:
	./softhsm-setup.sh

# Runs keyissuerd in the foreground with $(CONFIG) (config.example.toml) on
# the dev token; Ctrl-C stops it cleanly (pooled keys destroyed, records
# marked).
run: export SOFTHSM2_CONF := $(CURDIR)/.softhsm/softhsm2.conf
run: build softhsm
	$(BIN)/keyissuerd -config $(CONFIG)

# Every test with the race detector. Integration tests make their own SoftHSM
# tokens in a temp dir (hsm/hsmtest); the dev token is not touched.
# On a machine without SoftHSM, softhsm-setup.sh installs it (as root) or
# says how.
test:
	@command -v softhsm2-util >/dev/null || ./softhsm-setup.sh
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout 15m $(PKGS)

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
