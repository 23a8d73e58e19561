// The HTB scheduler alone on a virtual clock, with seed 003's uplink
// (configs/lab-qos.yaml): the shares the lab measures, without the lab's
// noise, and the delay a prio-0 class sees behind a link busy with large
// frames.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "qos/htb.hh"

namespace moat::qos {
namespace {

constexpr uint64_t kHz = 1'000'000'000;  // nanoseconds
constexpr uint64_t kLink = 128'000;      // bit/s

enum Kind : uintptr_t { kAudio = 1, kCamera, kAck, kWeb, kVideo };

struct Seed003 {
  Plan plan;
  int audio, camera, web, video;
  Seed003() {
    auto add = [&](const char* n, int parent, uint64_t rate, uint64_t ceil, uint8_t prio, uint32_t queue) {
      ClassSpec c;
      c.name = n;
      c.parent = parent;
      c.rate = rate / 8;
      c.ceil = ceil / 8;
      c.prio = prio;
      c.limit = queue;
      plan.classes.push_back(c);
      return int(plan.classes.size() - 1);
    };
    add("wan", -1, kLink, kLink, 0, 128);
    camera = add("camera", 0, 12'000, kLink, 0, 16);
    audio = add("audio", 0, 80'000, kLink, 1, 16);
    int data = add("data", 0, 36'000, kLink, 0, 128);
    web = add("web", data, 24'000, 32'000, 2, 12);
    video = add("video", data, 12'000, kLink, 3, 10);
  }
};

struct Outcome {
  std::vector<uint64_t> sent_bytes = std::vector<uint64_t>(8, 0);  // by Kind, in the window
  std::vector<double> camera_wait_ms;
  uint64_t window_bytes_max = 0;  // most bytes sent in any 100 ms
};

// Audio 390-byte frames every 40 ms (64 kbit/s of inner packets in ESP),
// a 154-byte camera request every 250 ms and its 122-byte ACK 40 ms later,
// web (1514) and video (1070) always backlogged. Counts from `from` s.
Outcome offer(bool audio_on, double seconds, double from) {
  Seed003 t;
  EXPECT_TRUE(validate(t.plan).empty());
  Scheduler s(t.plan, kHz);
  Outcome r;
  const uint64_t step = 100'000;  // 0.1 ms
  uint64_t next_audio = 0, next_cam = 0, next_ack = UINT64_MAX, cam_enq = 0;
  std::vector<std::pair<uint64_t, uint32_t>> recent;  // (t, bytes) of the last 100 ms
  uint64_t recent_bytes = 0;
  for (uint64_t now = 0; now < uint64_t(seconds * kHz); now += step) {
    if (audio_on && now >= next_audio) {
      s.enqueue(t.audio, reinterpret_cast<void*>(kAudio), 390, now);
      next_audio += 40'000'000;
    }
    if (now >= next_cam) {
      cam_enq = now;
      s.enqueue(t.camera, reinterpret_cast<void*>(kCamera), 154, now);
      next_cam += 250'000'000;
      next_ack = now + 40'000'000;
    }
    if (now >= next_ack) {
      s.enqueue(t.camera, reinterpret_cast<void*>(kAck), 122, now);
      next_ack = UINT64_MAX;
    }
    while (s.enqueue(t.web, reinterpret_cast<void*>(kWeb), 1514, now)) {
    }
    while (s.enqueue(t.video, reinterpret_cast<void*>(kVideo), 1070, now)) {
    }
    if (s.next_send(now) > now) continue;
    void* out[32];
    void* dropped[32];
    unsigned nd = 0;
    unsigned n = s.dequeue(now, out, 32, dropped, &nd);
    for (unsigned i = 0; i < n; i++) {
      auto k = reinterpret_cast<uintptr_t>(out[i]);
      uint32_t len = k == kAudio ? 390 : k == kCamera ? 154 : k == kAck ? 122 : k == kWeb ? 1514 : 1070;
      if (now >= uint64_t(from * kHz)) {
        r.sent_bytes[k] += len;
        if (k == kCamera) r.camera_wait_ms.push_back(double(now - cam_enq) / 1e6);
      }
      recent.push_back({now, len});
      recent_bytes += len;
    }
    while (!recent.empty() && recent.front().first + 100'000'000 <= now) {
      recent_bytes -= recent.front().second;
      recent.erase(recent.begin());
    }
    r.window_bytes_max = std::max(r.window_bytes_max, recent_bytes);
  }
  return r;
}

double kbit(const Outcome& r, Kind k, double secs) { return double(r.sent_bytes[k]) * 8 / secs / 1000; }

TEST(HtbSeed003, SharesWhileAudioTalks) {
  Outcome r = offer(true, 22, 2);
  const double secs = 20;
  double camera = kbit(r, kCamera, secs) + kbit(r, kAck, secs);  // 8.8 kbit/s offered
  EXPECT_NEAR(kbit(r, kAudio, secs), 78.0, 0.5);
  EXPECT_NEAR(camera, 8.8, 0.3);
  // The spare (128 - 78 - 8.8 - 24 - 12 = 5.2) goes to web first (prio 2,
  // below its 32k ceiling); video keeps its rate (seed 003: 10 to 30).
  EXPECT_NEAR(kbit(r, kWeb, secs), 29.2, 1.0);
  EXPECT_NEAR(kbit(r, kVideo, secs), 12.0, 1.0);
  // The root is the link: in any 100 ms at most the link's 1600 bytes,
  // plus its bucket (one 1514-byte frame), plus the frame that may leave
  // when the bucket is just not empty.
  EXPECT_LE(r.window_bytes_max, kLink / 8 / 10 + 1514 + 1514);
}

TEST(HtbSeed003, VideoBorrowsAudiosShareWhenAudioStops) {
  Outcome r = offer(false, 22, 2);
  const double secs = 20;
  EXPECT_NEAR(kbit(r, kWeb, secs), 32.0, 1.0);  // at its ceiling
  EXPECT_NEAR(kbit(r, kVideo, secs), 128 - 8.8 - 32, 1.5);
}

TEST(HtbSeed003, CameraAtPrio0WaitsAtMostTheFrameOnTheWire) {
  Outcome r = offer(true, 22, 2);
  ASSERT_FALSE(r.camera_wait_ms.empty());
  // One 1514-byte frame at 128 kbit/s is 94.6 ms; the camera never waits
  // longer (audio, prio 1, does not pass it), and usually much less.
  std::vector<double> w = r.camera_wait_ms;
  std::sort(w.begin(), w.end());
  EXPECT_LE(w.back(), 1514 * 8.0 / kLink * 1000 + 0.2);
  EXPECT_LE(w[w.size() / 2], 40.0);
}

}  // namespace
}  // namespace moat::qos
