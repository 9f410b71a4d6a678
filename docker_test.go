package main

import (
	"debug/elf"
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// dockerfile returns the Dockerfile with continuation lines joined.
func dockerfile(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	return strings.ReplaceAll(string(b), "\\\n", " ")
}

func TestDockerfileMatchesGoMod(t *testing.T) {
	mod, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	goVersion := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(string(mod))
	if goVersion == nil {
		t.Fatal("no go directive in go.mod")
	}
	df := dockerfile(t)
	for _, want := range []string{
		"FROM golang:" + goVersion[1] + "-alpine AS build",
		"FROM alpine:", "ca-certificates", "USER 10001", "EXPOSE 8080",
		"ENV API_URL=https://api.comput3.ai/api/v0", "LOG_LEVEL=INFO",
		// The runtime image has busybox wget; the probe hits /healthz.
		"HEALTHCHECK", "CMD wget -q -O /dev/null \"http://127.0.0.1:${PORT}/healthz\"",
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	if build := buildLine(t); !strings.Contains(string(readme), build) {
		t.Errorf("the README's local build differs from the Dockerfile's: want %q in README.md", build)
	}
}

// buildLine is the Dockerfile's build command, output path included.
func buildLine(t *testing.T) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^RUN (CGO_ENABLED=0 go build [^\n]*-o )(\S+)( \.)$`).FindStringSubmatch(dockerfile(t))
	if m == nil {
		t.Fatal("no `RUN CGO_ENABLED=0 go build ... -o <path> .` line in the Dockerfile")
	}
	return m[1] + "c3-node-proxy" + m[3]
}

// TestStaticBuildRunsUnprivileged builds the binary the way the Dockerfile's
// builder stage does, checks that it is static, and runs it as uid 10001.
func TestStaticBuildRunsUnprivileged(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	dir, err := os.MkdirTemp("", "c3p-static")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	build := strings.Replace(buildLine(t), "-o c3-node-proxy", "-o "+dir+"/c3-node-proxy", 1)
	cmd := exec.Command("sh", "-c", build)
	cmd.Env = append(os.Environ(), "GOFLAGS=") // no -race or other test flags
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", build, err, out)
	}
	bin := dir + "/c3-node-proxy"

	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("the binary asks for a dynamic loader")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("the binary links %v", libs)
	}
	if f.Section(".symtab") != nil {
		t.Errorf("the binary keeps its symbol table: -ldflags \"-s -w\" missing")
	}
	f.Close()

	port := freePort(t)
	run := exec.Command(bin)
	run.Env = []string{"PORT=" + port, "LOG_FORMAT=json"}
	if os.Getuid() == 0 {
		run.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 10001, Gid: 10001}}
	} else {
		t.Log("not root: the binary runs as the current user, not uid 10001")
	}
	out := &syncBuffer{}
	run.Stdout, run.Stderr = out, out
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		run.Process.Signal(syscall.SIGTERM)
		if err := within(10*time.Second, run.Wait); err != nil {
			t.Errorf("after SIGTERM: %v\n%s", err, out)
		}
	}()
	waitFor(t, 10*time.Second, func() bool {
		res, err := http.Get("http://127.0.0.1:" + port + "/healthz")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == http.StatusOK
	})
	if os.Getuid() == 0 {
		status, err := os.ReadFile("/proc/" + strconv.Itoa(run.Process.Pid) + "/status")
		if err != nil || !regexp.MustCompile(`(?m)^Uid:\s+10001\s`).Match(status) {
			t.Errorf("the process does not run as uid 10001: %v", err)
		}
	}
}

// TestReadmeMatchesTheProgram keeps the README honest: every metric the
// proxy writes and every variable it reads is documented, and the example
// Kubernetes grace period outlasts the default shutdown timeout.
func TestReadmeMatchesTheProgram(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	cfg, _ := loadConfig(env(nil))
	p := newProxy(newCache(cfg.apiURL, nil, cfg, newLogger(io.Discard, cfg)), newBalancer(), nil, cfg, newLogger(io.Discard, cfg))
	p.bal.acquire("n:1") // so that the node series are written
	var metrics strings.Builder
	p.writeMetrics(&metrics)
	for _, m := range regexp.MustCompile(`(?m)^# TYPE (\S+)`).FindAllStringSubmatch(metrics.String(), -1) {
		if !strings.Contains(readme, "`"+m[1]+"`") {
			t.Errorf("README does not document the metric %s", m[1])
		}
	}
	for _, v := range []string{"API_URL", "PORT", "LOG_LEVEL", "LOG_FORMAT", "REFRESH_INTERVAL", "IDLE_TIMEOUT",
		"NODE_SCHEME", "SHUTDOWN_TIMEOUT", "RETRIES", "API_TIMEOUT", "API_CONCURRENCY", "MAX_KEYS", "ACCESS_LOG"} {
		if !strings.Contains(readme, "| `"+v+"` |") {
			t.Errorf("README's configuration table lacks %s", v)
		}
	}
	grace := regexp.MustCompile(`terminationGracePeriodSeconds: (\d+)`).FindStringSubmatch(readme)
	if grace == nil {
		t.Fatal("README has no Kubernetes terminationGracePeriodSeconds")
	}
	if secs, _ := strconv.Atoi(grace[1]); time.Duration(secs)*time.Second <= defaultShutdownTimeout {
		t.Errorf("terminationGracePeriodSeconds %s does not outlast SHUTDOWN_TIMEOUT %v", grace[1], defaultShutdownTimeout)
	}
}
