// A class-conditional convolutional U-Net velocity field v_theta(x, t | c) for images, and its low-rank
// adapters (LoRA) for fine-tuning (docs/equations.md, E124, E125).
//
// States stay flat: x is [B, d] with d = channels * height * width, the pixels of each image in
// row-major [channels, height, width] order, so that x.view({B, C, H, W}) is the image batch at no cost.
// Every sampler, trainer and reward of tilt therefore runs a U-Net unchanged.
#pragma once

#include "tilt/model/velocity.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tilt {

struct UNetOptions {
  int64_t channels = 1;                    ///< image channels C
  int64_t height = 28;                     ///< H, divisible by 2^(levels - 1)
  int64_t width = 28;                      ///< W, divisible by 2^(levels - 1)
  int64_t base_channels = 32;              ///< feature channels at the first level
  std::vector<int64_t> channel_mult{1, 2, 2};  ///< per level (resolution H, H/2, H/4, ...): base_channels * mult
  int64_t blocks = 2;                      ///< residual blocks per level, on the way down and on the way up
  int64_t groups = 8;                      ///< GroupNorm groups; divides every level's channels
  bool attention = false;                  ///< one self-attention block at the lowest resolution
  int64_t time_features = 32;              ///< sinusoidal features of t (even)
  /// The size of a condition c (a class's one-hot row; 0: unconditional). c and a flag that is 1 for a
  /// given condition and 0 for the null one enter the embedding, as in MlpOptions.
  int64_t condition_dim = 0;
  bool zero_output = false;                ///< initialise the last convolution to 0 (residual networks)

  int64_t dim() const { return channels * height * width; }
  /// The first option out of range: its name (as in this struct) and what is wrong; nullopt if none is.
  std::optional<std::pair<std::string, std::string>> problem() const;
  /// Throws tilt::Error "unet: <what is wrong>" for problem().
  void validate() const;
};

/// Low-rank adapters: every convolution and linear layer's weight W [out, in, (k, k)] becomes
/// W + (alpha / rank) B A with A [rank, in k k] and B [out, rank], B = 0 at the start (E125).
struct LoraOptions {
  int64_t rank = 4;
  double alpha = 4.0;
  void validate() const;
};

class UNetVelocity : public VelocityField {
 public:
  /// Initialises the weights from `seed` (PyTorch's default uniform(+-1/sqrt(fan_in)) law; GroupNorm
  /// scale 1, shift 0).
  UNetVelocity(const UNetOptions& options, SchedulePtr schedule, uint64_t seed);
  ~UNetVelocity() override;

  std::string kind() const override { return "unet"; }
  int64_t dim() const override { return options_.dim(); }
  using VelocityField::velocity;
  Tensor velocity(const Tensor& x, const Tensor& t) const override;
  int64_t condition_dim() const override { return options_.condition_dim; }
  Tensor conditional_velocity(const Tensor& x, const Tensor& t, const Tensor& c) const override;
  /// One pass: the dropped rows get the null condition's inputs (c = 0, flag 0).
  Tensor conditional_velocity_masked(const Tensor& x, const Tensor& t, const Tensor& c, const Tensor& keep) const override;
  /// Rows are independent (GroupNorm normalises each image alone) and each costs a whole network.
  bool parallel_rows() const override { return true; }

  /// The trainable tensors: all of them, or with adapters only the adapters (the base stays frozen).
  std::vector<Tensor> parameters() const override;
  /// Every tensor: the network's, then the adapters' ("<layer>.lora_a", "<layer>.lora_b").
  NamedTensors named_parameters() const override;
  /// Copies values in; throws tilt::Error naming a missing, unexpected or mis-shaped tensor.
  void load_parameters(const NamedTensors& values);
  void set_trainable(bool trainable) override;
  /// A deep copy (adapters included).
  VelocityFieldPtr clone() const override;

  /// A U-Net that shares this one's weights, frozen, and adds zero-initialised adapters seeded by
  /// `seed`: the same field until the adapters train (E125). Throws tilt::Error if this one already has
  /// adapters or the options are out of range.
  std::shared_ptr<UNetVelocity> with_lora(const LoraOptions& lora, uint64_t seed) const;
  bool has_lora() const;
  const LoraOptions& lora() const { return lora_; }
  /// The largest min(fan in, fan out) of the layers adapters go on: from a rank above it no adapter is low-rank any
  /// more (B A can be any update of every layer), and the adapters hold more numbers than the weights they adapt.
  int64_t largest_lora_rank() const;

  /// Moves or converts every tensor (device, dtype) in place, keeping which ones train: a LoRA network
  /// and the base whose weights it shares move together.
  void cast(const at::TensorOptions& options);
  void to(const at::Device& device) override { cast(at::TensorOptions().device(device)); }

  const UNetOptions& options() const { return options_; }

  /// The network as TorchScript source, for tilt/model/torchscript.h's exporter: `source` defines
  /// forward(self, x, t) (a conditional network: forward(self, x, t, c: Optional[Tensor]), c [B, dc] or None for
  /// the null condition) on flat x [B, d] and t [B], computing in the weights' dtype as velocity() does, and reads
  /// every tensor as self.<name> from `tensors`: the network's (dots in names become underscores), each adapted
  /// weight with its adapters merged in, W + (alpha / rank) B A (E125).
  struct ScriptForm {
    std::string source;
    NamedTensors tensors;
  };
  ScriptForm script_form() const;
  /// The names and shapes of the network's tensors for these options, and of the adapters `lora` adds, in
  /// named_parameters()'s order, computed without allocating any: what a model file is checked against.
  /// Throws tilt::Error for options out of range.
  static std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes(
      const UNetOptions& options, const std::optional<LoraOptions>& lora = std::nullopt);

 private:
  Tensor conditioned(const Tensor& x, const Tensor& t, const Tensor& c, const Tensor& keep) const;
  struct Impl;
  UNetVelocity(const UNetVelocity& other, const LoraOptions& lora, uint64_t seed);
  UNetOptions options_;
  LoraOptions lora_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tilt
