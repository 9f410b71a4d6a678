package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary run as the real program (C3P_RUN_MAIN=1),
// so that the tests can start it as a child process without a build step.
func TestMain(m *testing.M) {
	if os.Getenv("C3P_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func env(vars map[string]string) func(string) string {
	return func(name string) string { return vars[name] }
}

func TestLoadConfigDefaults(t *testing.T) {
	cfg, err := loadConfig(env(nil))
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct{ what, got, want string }{
		{"API_URL", cfg.apiURL.String(), "https://api.comput3.ai/api/v0"},
		{"PORT", strconv.Itoa(cfg.port), "8080"},
		{"LOG_LEVEL", cfg.logLevel.String(), "INFO"},
		{"LOG_FORMAT json", strconv.FormatBool(cfg.logJSON), "false"},
		{"REFRESH_INTERVAL", cfg.refreshInterval.String(), "1m0s"},
		{"IDLE_TIMEOUT", cfg.idleTimeout.String(), "3m0s"},
		{"NODE_SCHEME", cfg.nodeScheme, "https"},
		{"SHUTDOWN_TIMEOUT", cfg.shutdownTimeout.String(), "30s"},
		{"API_TIMEOUT", cfg.apiTimeout.String(), "10s"},
		{"API_CONCURRENCY", strconv.Itoa(cfg.apiConcurrency), "32"},
		{"MAX_KEYS", strconv.Itoa(cfg.maxKeys), "10000"},
		{"RETRIES", strconv.Itoa(cfg.retries), "2"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %s, want %s", c.what, c.got, c.want)
		}
	}
}

func TestLoadConfigValues(t *testing.T) {
	cfg, err := loadConfig(env(map[string]string{
		"API_URL": "http://127.0.0.1:9/api", "PORT": "9090", "LOG_LEVEL": "debug", "LOG_FORMAT": "JSON",
		"REFRESH_INTERVAL": "5s", "IDLE_TIMEOUT": "1h", "NODE_SCHEME": "HTTP", "SHUTDOWN_TIMEOUT": "2m",
		"API_TIMEOUT": "3s", "API_CONCURRENCY": "4", "MAX_KEYS": "7", "RETRIES": "0",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.apiURL.String() != "http://127.0.0.1:9/api" || cfg.port != 9090 || cfg.logLevel != slog.LevelDebug ||
		!cfg.logJSON || cfg.refreshInterval != 5*time.Second || cfg.idleTimeout != time.Hour ||
		cfg.nodeScheme != "http" || cfg.shutdownTimeout != 2*time.Minute || cfg.apiTimeout != 3*time.Second ||
		cfg.apiConcurrency != 4 || cfg.maxKeys != 7 || cfg.retries != 0 {
		t.Fatalf("config not as set: %+v", cfg)
	}
	for _, level := range []string{"DEBUG", "info", "Warn", "ERROR"} {
		if _, err := loadConfig(env(map[string]string{"LOG_LEVEL": level})); err != nil {
			t.Errorf("LOG_LEVEL=%s: %v", level, err)
		}
	}
}

func TestLoadConfigRejects(t *testing.T) {
	tests := []struct{ name, value string }{
		{"API_URL", "api.comput3.ai"},
		{"API_URL", "ftp://api.comput3.ai"},
		{"API_URL", "https://"},
		{"API_URL", "::"},
		{"PORT", "http"},
		{"PORT", "70000"},
		{"PORT", "-1"},
		{"LOG_LEVEL", "verbose"},
		{"LOG_LEVEL", "INFO+2"},
		{"LOG_FORMAT", "xml"},
		{"REFRESH_INTERVAL", "60"},
		{"REFRESH_INTERVAL", "-1s"},
		{"IDLE_TIMEOUT", "soon"},
		{"SHUTDOWN_TIMEOUT", "0s"},
		{"NODE_SCHEME", "ftp"},
		{"API_TIMEOUT", "10"},
		{"API_CONCURRENCY", "0"},
		{"MAX_KEYS", "many"},
		{"RETRIES", "-1"},
	}
	for _, tc := range tests {
		t.Run(tc.name+"="+tc.value, func(t *testing.T) {
			t.Parallel()
			_, err := loadConfig(env(map[string]string{tc.name: tc.value}))
			if err == nil {
				t.Fatal("accepted")
			}
			if msg := err.Error(); !strings.Contains(msg, tc.name) || !strings.Contains(msg, strconv.Quote(tc.value)) || strings.Contains(msg, "\n") {
				t.Fatalf("message %q must name %s and %q on one line", msg, tc.name, tc.value)
			}
		})
	}
}

// startProgram runs the real program as a child process with extra env.
func startProgram(t *testing.T, vars ...string) (*exec.Cmd, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), append([]string{"C3P_RUN_MAIN=1"}, vars...)...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd, out
}

func TestProgramRejectsInvalidConfig(t *testing.T) {
	for _, v := range []string{"PORT=eighty", "REFRESH_INTERVAL=often", "API_URL=nowhere", "LOG_LEVEL=loud"} {
		cmd, out := startProgram(t, v)
		err := cmd.Wait()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() == 0 {
			t.Errorf("%s: exited with %v, want a non-zero code", v, err)
		}
		name, value, _ := strings.Cut(v, "=")
		msg := strings.TrimSpace(out.String())
		if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, name) || !strings.Contains(msg, value) {
			t.Errorf("%s: want one line naming the variable and value, got %q", v, msg)
		}
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// TestProgramStartsWithDefaults starts the program with nothing but a free
// port, checks /healthz and that SIGTERM ends it with status 0.
func TestProgramStartsWithDefaults(t *testing.T) {
	port := freePort(t)
	cmd, out := startProgram(t, "PORT="+port, "API_URL=", "LOG_LEVEL=", "LOG_FORMAT=json")
	var res *http.Response
	waitFor(t, 10*time.Second, func() bool {
		var err error
		res, err = http.Get("http://127.0.0.1:" + port + "/healthz")
		return err == nil
	})
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("/healthz: %d", res.StatusCode)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := within(10*time.Second, cmd.Wait); err != nil {
		t.Fatalf("after SIGTERM: %v; output:\n%s", err, out)
	}
	first, _, _ := strings.Cut(out.String(), "\n")
	if !strings.HasPrefix(first, "{") || !strings.Contains(first, "api.comput3.ai") {
		t.Errorf("first log line is not the JSON start-up line with the config: %q", first)
	}
}

func TestGracefulShutdownLetsStreamsFinish(t *testing.T) {
	for _, tc := range []struct {
		name     string
		grace    time.Duration
		finishes bool
	}{
		{"stream ends within the grace period", 10 * time.Second, true},
		{"stream outlives the grace period", 200 * time.Millisecond, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			api := newFakeAPI(t)
			release := make(chan struct{})
			defer func() {
				select {
				case <-release:
				default:
					close(release)
				}
			}()
			node := streamingNode(t, "text/event-stream", []string{"data: 1\n\n"}, []string{"data: 2\n\n", "data: [DONE]\n\n"}, release)
			const key = "key-shutdown-01"
			api.set(key, wl("w1", node.host, 1))

			cfg, _ := loadConfig(env(map[string]string{"API_URL": api.url, "NODE_SCHEME": "http"}))
			cfg.shutdownTimeout = tc.grace
			logs := &syncBuffer{}
			log := newLogger(logs, cfg)
			nodes := newNodeTransport()
			nodes.TLSClientConfig = &tls.Config{RootCAs: testCertPool()}
			p := newProxy(newCache(cfg.apiURL, newAPIClient(cfg), cfg, log), newBalancer(), nodes, cfg, log)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			addr := ln.Addr().String()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			served := make(chan error, 1)
			go func() { served <- serve(ctx, cfg, ln, p, log) }()

			req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/0/stream", nil)
			req.Header.Set("X-C3-API-KEY", key)
			client := &http.Client{Transport: &http.Transport{}}
			res, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			br := bufio.NewReader(res.Body)
			if line, err := br.ReadString('\n'); err != nil || line != "data: 1\n" {
				t.Fatalf("first event: %q, %v", line, err)
			}

			cancel() // as SIGTERM does
			waitFor(t, 5*time.Second, func() bool {
				conn, err := net.Dial("tcp", addr)
				if err == nil {
					conn.Close()
				}
				return err != nil
			})

			if tc.finishes {
				close(release)
				rest, err := io.ReadAll(br)
				if err != nil || !bytes.HasSuffix(rest, []byte("data: [DONE]\n\n")) {
					t.Fatalf("the stream did not finish during shutdown: %q, %v", rest, err)
				}
			} else {
				if _, err := io.ReadAll(br); err == nil {
					t.Fatalf("a stream past the grace period ended cleanly")
				}
			}
			if err := within(15*time.Second, func() error { return <-served }); err != nil {
				t.Fatalf("serve: %v", err)
			}
			select {
			case <-p.cache.stopped:
			default:
				t.Fatalf("the refresher still runs after serve returned")
			}
			waitFor(t, 5*time.Second, func() bool { return p.bal.inFlight(node.host) == 0 })
		})
	}
}
