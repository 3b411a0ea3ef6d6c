// What tilt promises about its files: a full disk, a killed writer, a second writer, a damaged file
// or an output path that names an input never lose or silently change what is already on disk.
#include "tilt/core/error.h"
#include "tilt/core/fs.h"
#include "tilt/core/progress.h"
#include "tilt/io/model_io.h"
#include "tilt/model/mlp.h"
#include "tilt/train/flow_matching.h"
#include "tilt/train/trainer.h"

#include "../support/checks.h"
#include "../support/helpers.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace tilt {
namespace {

namespace fs = std::filesystem;
using test::TempDir;
using test::error_of;
using test::expect_contains;

// A 512 KiB tmpfs, so that "the disk is full" can be made to happen. Mounting needs root (CI runs as
// root); elsewhere the tests that use it are skipped with a message.
class SmallDisk {
 public:
  SmallDisk() : path_(dir_.file("disk")) {
    fs::create_directories(path_);
    mounted_ = ::geteuid() == 0 && ::mount("tmpfs", path_.c_str(), "tmpfs", 0, "size=512k") == 0;
  }
  ~SmallDisk() {
    if (mounted_) ::umount2(path_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  // Fills the disk but for about `leave` bytes, with a file that free() removes.
  void fill(size_t leave = 0) {
    const std::string chunk(4096, 'x');
    std::FILE* f = std::fopen(file("filler").c_str(), "ab");
    ASSERT_NE(f, nullptr);
    while (std::fwrite(chunk.data(), 1, chunk.size(), f) == chunk.size() && std::fflush(f) == 0) {
    }
    std::fclose(f);
    const auto size = fs::file_size(file("filler"));
    fs::resize_file(file("filler"), size > leave ? size - leave : 0);
  }
  void free() { fs::remove(file("filler")); }
  // The names of the temporary files left in the directory.
  std::vector<std::string> temporaries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path_)) {
      if (e.path().filename().string().find(".tmp.") != std::string::npos) out.push_back(e.path().string());
    }
    return out;
  }

 private:
  TempDir dir_;
  std::string path_;
  bool mounted_ = false;
};

#define REQUIRE_SMALL_DISK(disk) \
  if (!(disk).mounted()) GTEST_SKIP() << "needs root to mount a small tmpfs (a full disk); skipped"

struct Rig {
  std::shared_ptr<MlpVelocity> model;
  std::unique_ptr<FlowMatching> loss;
  Rig() {
    model = std::make_shared<MlpVelocity>(MlpOptions{2, {16, 16}, 4, false}, make_linear_schedule(), 5);
    auto mixture = test::ring_mixture_2d();
    loss = std::make_unique<FlowMatching>(
        model, [mixture](int64_t n, Generator& gen) { return mixture->sample(n, gen).to(at::kFloat); },
        FlowMatchingOptions{32});
  }
};

TrainerOptions options(int64_t iterations, const std::string& dir) {
  TrainerOptions o;
  o.iterations = iterations;
  o.progress = false;
  o.seed = 3;
  o.checkpoint_path = dir + "/checkpoint.pt";
  o.metrics_path = dir + "/metrics.jsonl";
  o.checkpoint_every = 1;
  return o;
}

std::string slurp(const std::string& path) { return read_file(path); }

TEST(Files, AtomicWriteOnAFullDiskKeepsTheOldFileAndNoTemporary) {
  SmallDisk disk;
  REQUIRE_SMALL_DISK(disk);
  atomic_write(disk.file("a.txt"), "old");
  disk.fill();
  const std::string msg = error_of([&] { atomic_write(disk.file("a.txt"), std::string(64 * 1024, 'n')); });
  expect_contains(msg, "cannot write '" + disk.file("a.txt") + "'");
  expect_contains(msg, "No space left on device");
  EXPECT_EQ(slurp(disk.file("a.txt")), "old");
  EXPECT_TRUE(disk.temporaries().empty());
}

TEST(Files, CheckpointOnAFullDiskIsAnErrorAndTheLastOneStaysReadable) {
  SmallDisk disk;
  REQUIRE_SMALL_DISK(disk);
  Rig a;
  TrainerOptions o = options(2, disk.file("run"));
  make_directories(disk.file("run"));
  Trainer trainer(*a.loss, o);
  trainer.run();  // checkpoints at 1 and 2
  const std::string before = slurp(o.checkpoint_path);
  disk.fill();
  // LibTorch's zip writer, given a file, throws from a destructor here and the process aborts.
  const std::string msg = error_of([&] { trainer.save_checkpoint(o.checkpoint_path); });
  expect_contains(msg, "checkpoint.pt");
  expect_contains(msg, "No space left on device");
  EXPECT_EQ(slurp(o.checkpoint_path), before);
  EXPECT_TRUE(disk.temporaries().empty());
  disk.free();
  Rig b;
  Trainer again(*b.loss, options(2, disk.file("run")));
  again.load_checkpoint(o.checkpoint_path);
  EXPECT_EQ(again.iteration(), 2);
}

TEST(Files, MetricsOnAFullDiskStopTheRunWithoutAHalfRecord) {
  SmallDisk disk;
  REQUIRE_SMALL_DISK(disk);
  Rig a;
  TrainerOptions o = options(400, disk.file("run"));
  o.checkpoint_every = 0;  // only the metrics grow
  make_directories(disk.file("run"));
  disk.fill(6000);  // room for a few dozen lines
  Trainer trainer(*a.loss, o);
  const std::string msg = error_of([&] { trainer.run(); });
  expect_contains(msg, "cannot write metrics file '" + o.metrics_path + "'");
  EXPECT_LT(trainer.iteration(), 400);
  std::istringstream lines(slurp(o.metrics_path));
  std::string line;
  int64_t n = 0;
  while (std::getline(lines, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_TRUE(j.is_object()) << "line " << n + 1 << " is not a whole record: " << line;
    EXPECT_EQ(j["iteration"].get<int64_t>(), ++n);
  }
  EXPECT_GT(n, 0);
  EXPECT_EQ(slurp(o.metrics_path).back(), '\n');
}

// The PID of a process that has ended (a child that exited at once).
long dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);
  return static_cast<long>(child);
}

TEST(Files, TemporariesOfKilledProcessesAreRemovedAndLiveOnesKept) {
  TempDir dir;
  const std::string dead = std::to_string(dead_pid());
  atomic_write(dir.file("model.pt.tmp." + dead), "half a model");
  atomic_write(dir.file("metrics.jsonl.tmp." + dead), "half");
  atomic_write(dir.file("model.pt.tmp.1"), "a live process's (PID 1)");
  atomic_write(dir.file("notes.tmp.txt"), "not a temporary");
  atomic_write(dir.file("model.pt"), "new");  // cleans its own name's stale temporaries
  EXPECT_FALSE(file_exists(dir.file("model.pt.tmp." + dead)));
  EXPECT_TRUE(file_exists(dir.file("metrics.jsonl.tmp." + dead)));
  EXPECT_TRUE(file_exists(dir.file("model.pt.tmp.1")));
  remove_stale_temporaries_in(dir.file(""));
  EXPECT_FALSE(file_exists(dir.file("metrics.jsonl.tmp." + dead)));
  EXPECT_TRUE(file_exists(dir.file("model.pt.tmp.1")));
  EXPECT_TRUE(file_exists(dir.file("notes.tmp.txt")));
}

TEST(Files, ADirectoryIsNotAFileToWrite) {
  TempDir dir;
  make_directories(dir.file("d"));
  expect_contains(error_of([&] { atomic_write(dir.file("d"), "x"); }), "cannot write '" + dir.file("d") + "': it is a directory");
}

// A link is written through (a chain of them, relative and absolute), not replaced; a pipe is refused whole, since a
// rename over it would replace it, and so is a path ending in '/'.
TEST(Files, LinksAreWrittenThroughAndPipesAreRefused) {
  TempDir dir;
  make_directories(dir.file("sub"));
  fs::create_symlink("sub/target.txt", dir.file("first"));
  fs::create_symlink(dir.file("first"), dir.file("second"));
  atomic_write(dir.file("second"), "through");
  EXPECT_TRUE(fs::is_symlink(dir.file("second")));
  EXPECT_TRUE(fs::is_symlink(dir.file("first")));
  EXPECT_EQ(read_file(dir.file("sub/target.txt")), "through");
  fs::create_symlink("loop", dir.file("loop"));
  expect_contains(error_of([&] { atomic_write(dir.file("loop"), "x"); }), "too many levels of symbolic links");
  ASSERT_EQ(mkfifo(dir.file("pipe").c_str(), 0644), 0);
  expect_contains(error_of([&] { atomic_write(dir.file("pipe"), "x"); }), "it is not a regular file");
  EXPECT_TRUE(fs::is_fifo(dir.file("pipe")));
  expect_contains(error_of([&] { refuse_output_over_input("--out", dir.file("pipe"), {}); }), "not a regular file");
  expect_contains(error_of([&] { atomic_write(dir.file("new") + "/", "x"); }), "it names a directory");
  EXPECT_FALSE(file_exists(dir.file("new")));
}

TEST(Files, ASecondWriterOfADirectoryIsRefusedNamingTheFirst) {
  TempDir dir;
  {
    DirectoryLock first(dir.file("run"));
    const std::string msg = error_of([&] { DirectoryLock second(dir.file("run")); });
    expect_contains(msg, "'" + dir.file("run") + "' is in use by another tilt process (PID " + std::to_string(::getpid()) + ")");
  }
  DirectoryLock again(dir.file("run"));  // released with the first
}

TEST(Files, AnOutputThatNamesAnInputIsRefused) {
  TempDir dir;
  atomic_write(dir.file("model.pt"), "m");
  make_directories(dir.file("sub"));
  fs::create_symlink(dir.file("model.pt"), dir.file("link.pt"));
  EXPECT_TRUE(same_file(dir.file("model.pt"), dir.file("sub/../model.pt")));
  EXPECT_TRUE(same_file(dir.file("model.pt"), dir.file("link.pt")));
  EXPECT_TRUE(same_file(dir.file("new.csv"), dir.file("sub/../new.csv")));  // neither exists yet
  EXPECT_FALSE(same_file(dir.file("model.pt"), dir.file("other.pt")));
  const std::string msg = error_of(
      [&] { refuse_output_over_input("--out", dir.file("link.pt"), {{"--png", ""}, {"--model", dir.file("model.pt")}}); });
  expect_contains(msg, "--out '" + dir.file("link.pt") + "' is also --model '" + dir.file("model.pt") + "'");
  refuse_output_over_input("--out", dir.file("samples.csv"), {{"--model", dir.file("model.pt")}, {"--png", ""}});
}

// Flips one bit at each of many offsets of a file; each damaged copy must either be refused with a
// tilt::Error or load to exactly the same thing (a bit of the container that means nothing, e.g. a
// zip timestamp or an unused pickle memo index). Returns the offsets whose flip was not refused.
std::vector<size_t> flip_bits(const std::string& good, const std::string& damaged, const std::function<bool()>& load_same) {
  const std::string bytes = slurp(good);
  std::vector<size_t> accepted;
  const size_t stride = std::max<size_t>(1, bytes.size() / 300);
  for (size_t at = 0; at < bytes.size(); at += stride) {
    std::string copy = bytes;
    copy[at] = static_cast<char>(copy[at] ^ (1 << ((at / stride) % 8)));
    atomic_write(damaged, copy);
    try {
      EXPECT_TRUE(load_same()) << "a bit flipped at byte " << at << " of " << bytes.size() << " loaded as something else";
      accepted.push_back(at);
    } catch (const Error&) {
    } catch (const std::exception& e) {
      ADD_FAILURE() << "a bit flipped at byte " << at << " gave an error that is not tilt's: " << e.what();
    }
  }
  return accepted;
}

// The flips that loaded, as text for a message.
std::string offsets(const std::vector<size_t>& v) {
  std::string s;
  for (size_t x : v) s += std::to_string(x) + " ";
  return s;
}

TEST(Files, AFlippedBitInAModelFileIsRefused) {
  TempDir dir;
  MlpVelocity model(MlpOptions{3, {8}, 4, false}, make_linear_schedule(), 9);
  save_velocity(model, dir.file("model.pt"));
  at::NoGradGuard no_grad;
  const Tensor x = at::randn({5, 3}), t = at::full({5}, 0.3);
  const Tensor v = model.velocity(x, t);
  const auto accepted = flip_bits(dir.file("model.pt"), dir.file("damaged.pt"), [&] {
    return at::equal(load_velocity(dir.file("damaged.pt")).field->velocity(x, t), v);
  });
  // Those that loaded are zip bookkeeping that means nothing (local headers' zeroed fields, alignment
  // padding, data descriptors); without the checksums, flips in the tensors loaded as another model.
  EXPECT_LT(accepted.size(), 150u) << offsets(accepted);
}

TEST(Files, AFlippedBitInACheckpointIsRefused) {
  TempDir dir;
  Rig a;
  Trainer trainer(*a.loss, options(3, dir.file("run")));
  trainer.run();
  std::vector<Tensor> expected;
  for (const Tensor& p : a.model->parameters()) expected.push_back(p.detach().clone());
  const auto accepted = flip_bits(dir.file("run/checkpoint.pt"), dir.file("damaged.pt"), [&] {
    Rig b;
    Trainer other(*b.loss, options(3, dir.file("other")));
    other.load_checkpoint(dir.file("damaged.pt"));
    bool same = other.iteration() == 3;
    const auto params = b.model->parameters();
    for (size_t i = 0; i < params.size(); ++i) same = same && at::equal(params[i], expected[i]);
    return same;
  });
  EXPECT_TRUE(accepted.empty()) << offsets(accepted);  // the frame's checksum covers every byte
}

}  // namespace
}  // namespace tilt

// A progress bar into a file (not a terminal) prints the first update, a line per tenth and a final one; with a delay that the work
// does not outlast, it prints nothing at all (tilt sample's bar for quick draws).
TEST(ProgressBar, PrintsTenthsAndTheEndAndNothingForQuickWorkWithADelay) {
  const auto printed = [](double delay) {
    std::FILE* f = std::tmpfile();
    {
      tilt::ProgressBar bar("work", 20, 0, true, f);
      bar.set_delay(delay);
      for (int64_t i = 1; i <= 20; ++i) bar.update(i);
    }
    std::rewind(f);
    std::string text;
    for (int ch; (ch = std::fgetc(f)) != EOF;) text.push_back(static_cast<char>(ch));
    std::fclose(f);
    return text;
  };
  const std::string all = printed(0.0);
  EXPECT_EQ(std::count(all.begin(), all.end(), '\n'), 12) << all;  // 1/20, then 2/20, 4/20, ..., 20/20, then the end
  EXPECT_NE(all.find("work [########################] 20/20 100%"), std::string::npos) << all;
  EXPECT_NE(all.find("elapsed"), std::string::npos) << all;
  EXPECT_EQ(printed(60.0), "");
}
