package main

// Real InfluxDB clients, written by others, against the write endpoints:
// Debian's python3-influxdb (the v1 API) and npm's
// @influxdata/influxdb-client (v2). Without them the test is skipped;
// REQUIRE_CLIENTS=1 makes that a failure (CI sets it and installs both,
// the npm one under a directory it names in NODE_PATH).

import (
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
)

const pythonV1Client = `
import sys
from influxdb import InfluxDBClient
c = InfluxDBClient(host=sys.argv[1], port=int(sys.argv[2]), database="telegraf")
ok = c.write_points([
    {"measurement": "py_cpu", "tags": {"host": "a", "dc": "eu"}, "time": 1735725600,
     "fields": {"value": 1.5, "load": 3, "state": "busy", "up": True}},
    {"measurement": "py_cpu", "tags": {"host": "b", "dc": "eu"}, "time": 1735725601,
     "fields": {"value": 2.5, "load": 4}},
], time_precision="s")
print("written" if ok else "refused")
`

const nodeV2Client = `
const {InfluxDB, Point} = require('@influxdata/influxdb-client')
const influx = new InfluxDB({url: process.argv[process.argv.length - 1], token: 'any'})
const plain = influx.getWriteApi('org', 'bucket', 'ms')
plain.writePoint(new Point('js_mem').tag('host', 'a').floatField('value', 10.25).intField('used', 7)
  .uintField('free', 9).stringField('note', 'a "quoted", spaced note').booleanField('ok', true)
  .timestamp(new Date('2025-01-01T10:00:00.000Z')))
// Gzipped, as the client sends any body above its threshold.
const zipped = influx.getWriteApi('org', 'bucket', 'ms', {gzipThreshold: 0})
zipped.writePoint(new Point('js_mem').tag('host', 'b c').floatField('value', 20.5)
  .timestamp(new Date('2025-01-01T10:00:01.500Z')))
Promise.all([plain.close(), zipped.close()]).then(() => console.log('written'))
  .catch(e => { console.error(e); process.exit(1) })
`

// needClient finds a client's interpreter that can load its library,
// skipping without one unless REQUIRE_CLIENTS=1.
func needClient(t *testing.T, what string, candidates []string, probe ...string) string {
	t.Helper()
	for _, bin := range candidates {
		if path, err := exec.LookPath(bin); err == nil && exec.Command(path, probe...).Run() == nil {
			return path
		}
	}
	if os.Getenv("REQUIRE_CLIENTS") == "1" {
		t.Fatalf("REQUIRE_CLIENTS=1 but %s is missing", what)
	}
	t.Skipf("%s is missing", what)
	return ""
}

func TestRealInfluxClients(t *testing.T) {
	// Debian's package is for Debian's python, which a python3 earlier on
	// PATH may not be.
	python := needClient(t, "python3 with python3-influxdb (Debian)", []string{"/usr/bin/python3", "python3"}, "-c", "import influxdb")
	node := needClient(t, "node with @influxdata/influxdb-client (npm) in NODE_PATH", []string{"node"}, "-e", "require('@influxdata/influxdb-client')")
	forEachStore(t, nil, func(t *testing.T, e storeEnv) {
		base := serve(t, e.cfg, e.b)
		u, err := url.Parse(base)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []*exec.Cmd{
			exec.Command(python, "-c", pythonV1Client, u.Hostname(), u.Port()),
			exec.Command(node, "-e", nodeV2Client, base),
		} {
			if out, err := c.CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "written" {
				t.Fatalf("%s: %v\n%s", c.Args[0], err, out)
			}
		}
		for _, c := range []struct{ query, want string }{
			{"summary?metric_type=py_cpu", `"count":2,"average":2,"sum":4,"min":1.5,"max":2.5`},
			{"summary?metric_type=py_cpu.load", `"count":2,"average":3.5,"sum":7,"min":3,"max":4`},
			{"summary?metric_type=py_cpu&label=host:b&label=dc:eu", `"count":1,"average":2.5`},
			{"series?metric_type=py_cpu&from=2025-01-01T10:00:00Z&to=2025-01-01T10:00:02Z&step=1s", `"points":[{"time":"2025-01-01T10:00:00Z","count":1,"average":1.5,"sum":1.5,"min":1.5,"max":1.5,"p50":1.5,"p90":1.5,"p95":1.5,"p99":1.5},{"time":"2025-01-01T10:00:01Z","count":1,"average":2.5,`},
			{"summary?metric_type=js_mem", `"count":2,"average":15.375,"sum":30.75,"min":10.25,"max":20.5`},
			{"summary?metric_type=js_mem.used", `"count":1,"average":7,`},
			{"summary?metric_type=js_mem.free", `"count":1,"average":9,`},
			{"summary?metric_type=js_mem&label=host:b%20c", `"count":1,"average":20.5`},
			{"series?metric_type=js_mem&from=2025-01-01T10:00:00Z&to=2025-01-01T10:00:02Z&step=1s", `{"time":"2025-01-01T10:00:01Z","count":1,"average":20.5,`},
			{"types?prefix=js_mem.note", `{"types":[]}`},
			{"types?prefix=py_cpu.", `"type":"py_cpu.load"`},
		} {
			if r := get(t, base+"/api/metrics/"+c.query); r.status != 200 || !strings.Contains(r.body, c.want) {
				t.Errorf("%s = %d %s, want %s", c.query, r.status, r.body, c.want)
			}
		}
		for _, typ := range []string{"py_cpu.state", "py_cpu.up", "js_mem.note", "js_mem.ok"} {
			if n := count(t, e.b, typ); n != 0 {
				t.Errorf("%s holds %d samples: strings and booleans are skipped", typ, n)
			}
		}
	})
}
