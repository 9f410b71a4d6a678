# c3-node-proxy: a static Go binary on Alpine, running as an unprivileged user.
# The build line below is the one the README gives for a local build, and the
# one docker_test.go runs (it cannot run docker here): keep them identical.

FROM golang:1.26-alpine AS build
WORKDIR /src
COPY go.mod ./
COPY *.go ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/c3-node-proxy .

FROM alpine:3.22
RUN apk add --no-cache ca-certificates \
 && adduser -D -H -u 10001 -s /sbin/nologin c3proxy
COPY --from=build /out/c3-node-proxy /usr/local/bin/c3-node-proxy
USER 10001:10001
ENV API_URL=https://api.comput3.ai/api/v0 \
    LOG_LEVEL=INFO \
    PORT=8080
EXPOSE 8080
# busybox wget is part of the alpine image.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
  CMD wget -q -O /dev/null "http://127.0.0.1:${PORT}/healthz" || exit 1
ENTRYPOINT ["/usr/local/bin/c3-node-proxy"]
