# Build stage: the Go version matches go.mod.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY *.go ./
# The embedded files: the Redis scripts, the dashboard and the variables
# the usage lists.
COPY lua ./lua
COPY web ./web
COPY .env.example ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/analytics .

# Final stage: a static binary on distroless, as a non-root user.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/analytics /analytics
USER nonroot:nonroot
ENV ADDR=:8000
EXPOSE 8000
# The image has no shell and no curl: the binary checks its own /health.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/analytics", "-healthcheck"]
ENTRYPOINT ["/analytics"]
