#include "backends/collective_label.h"

#include <utility>

namespace fsdpsim {
namespace {
thread_local std::string current_label;
}  // namespace

ScopedCollectiveLabel::ScopedCollectiveLabel(std::string label) : previous_(std::move(current_label)) {
  current_label = std::move(label);
}

ScopedCollectiveLabel::~ScopedCollectiveLabel() { current_label = std::move(previous_); }

const std::string& current_collective_label() { return current_label; }

std::string& collective_label_slot() { return current_label; }

}  // namespace fsdpsim
