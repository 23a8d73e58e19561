#include "ctrl/cli_render.hh"

#include <algorithm>
#include <vector>

namespace moat {

using json = nlohmann::ordered_json;

namespace {

std::string scalar(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "-";
  return v.dump();
}

bool is_table(const json& v) {
  if (!v.is_array() || v.empty()) return false;
  for (auto& e : v)
    if (!e.is_object()) return false;
  return true;
}

void render(const json& v, const std::string& indent, std::string& out) {
  if (is_table(v)) {
    std::vector<std::string> cols;
    for (auto& row : v)
      for (auto it = row.begin(); it != row.end(); ++it)
        if (std::find(cols.begin(), cols.end(), it.key()) == cols.end()) cols.push_back(it.key());
    std::vector<size_t> width;
    for (auto& c : cols) width.push_back(c.size());
    std::vector<std::vector<std::string>> cells;
    for (auto& row : v) {
      std::vector<std::string> r;
      for (size_t i = 0; i < cols.size(); i++) {
        r.push_back(row.contains(cols[i]) ? scalar(row[cols[i]]) : "");
        width[i] = std::max(width[i], r.back().size());
      }
      cells.push_back(std::move(r));
    }
    auto line = [&](const std::vector<std::string>& r) {
      std::string l = indent;
      for (size_t i = 0; i < r.size(); i++) {
        l += r[i];
        if (i + 1 < r.size()) l += std::string(width[i] - r[i].size() + 2, ' ');
      }
      while (!l.empty() && l.back() == ' ') l.pop_back();
      out += l + "\n";
    };
    line(cols);
    for (auto& r : cells) line(r);
    return;
  }
  if (v.is_object()) {
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (it->is_structured()) {
        out += indent + it.key() + ":\n";
        if (it->empty()) out += indent + "  (none)\n";
        else render(*it, indent + "  ", out);
      } else {
        out += indent + it.key() + ": " + scalar(*it) + "\n";
      }
    }
    return;
  }
  if (v.is_array()) {
    if (v.empty()) out += indent + "(none)\n";
    for (auto& e : v) render(e, indent, out);
    return;
  }
  out += indent + scalar(v) + "\n";
}

}  // namespace

std::string render_human(const json& data) {
  std::string out;
  render(data, "", out);
  return out;
}

}  // namespace moat
