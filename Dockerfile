# berth container image: a static binary on an empty base, run as a non-root
# user.
#
#   docker build --build-arg BUILDER_IMAGE=golang:1.26 -t berth .
#   docker run -d -p 5000:5000 -v berth-cache:/var/lib/berth berth
#
# Only classic-builder instructions and exec-form RUN are used, so the build
# works without BuildKit and with a builder image that has a Go toolchain
# and CA certificates but no shell (deploy/image_test.go makes one from the
# machine's own Go). The builder must provide Go at the version go.mod asks.
ARG BUILDER_IMAGE=golang:1.26
FROM ${BUILDER_IMAGE} AS build
# Module downloads: point GOPROXY at a mirror or an internal proxy when the
# public one is out of reach.
ARG GOPROXY=https://proxy.golang.org,direct
ARG GOSUMDB=sum.golang.org
ARG GONOSUMDB=
ARG GOPRIVATE=
ENV CGO_ENABLED=0 \
    GOTOOLCHAIN=local \
    GOPROXY=${GOPROXY} \
    GOSUMDB=${GOSUMDB} \
    GONOSUMDB=${GONOSUMDB} \
    GOPRIVATE=${GOPRIVATE} \
    GOCACHE=/tmp/go-build \
    GOMODCACHE=/tmp/go-mod
# WORKDIR creates directories without needing mkdir in the builder; they are
# copied below with the runtime user as owner. (Before the build, so that
# these steps do not copy the build caches around.)
WORKDIR /rootfs/var/lib/berth
WORKDIR /rootfs/tmp
WORKDIR /src
COPY . .
# -buildvcs=false: .git is not in the build context.
RUN ["go", "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", "/rootfs/berth", "./cmd/berth"]

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /rootfs/berth /berth
COPY --from=build --chown=65532:65532 /rootfs/var/lib/berth /var/lib/berth
COPY --from=build --chown=65532:65532 /rootfs/tmp /tmp
USER 65532:65532
EXPOSE 5000
# A new volume starts as a copy of the image's /var/lib/berth, owned by 65532.
VOLUME ["/var/lib/berth"]
# Probes 127.0.0.1:5000, or $BERTH_LISTEN when set: to move berth to another
# port, set BERTH_LISTEN and leave --listen off the command, e.g.
#   docker run -e BERTH_LISTEN=0.0.0.0:6000 berth serve --data /var/lib/berth
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/berth", "healthcheck"]
ENTRYPOINT ["/berth"]
CMD ["serve", "--listen", "0.0.0.0:5000", "--data", "/var/lib/berth"]
