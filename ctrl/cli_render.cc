#include "ctrl/cli_render.hh"

#include <algorithm>
#include <vector>

namespace moat {

using json = nlohmann::ordered_json;

namespace {

// One cell or value on one line: control characters (a newline in a name)
// would break the table, so they become spaces.
std::string scalar(const json& v) {
  std::string s;
  if (v.is_string()) s = v.get<std::string>();
  else if (v.is_null()) s = "-";
  else s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  for (auto& ch : s)
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = ' ';
  return s;
}

// A list of flat records reads best as a table; a record that holds lists
// or records of its own (a QoS tree, a tunnel's SAs) reads best as a section.
bool is_table(const json& v) {
  return v.is_array() && !v.empty() && std::all_of(v.begin(), v.end(), [](const json& e) {
           return e.is_object() && std::none_of(e.begin(), e.end(), [](const json& f) { return f.is_structured(); });
         });
}

void pad(std::string& out, size_t n) { out.append(n, ' '); }

void table(const json& rows, const std::string& indent, std::string& out) {
  std::vector<std::string> cols;
  for (auto& row : rows)
    for (auto it = row.begin(); it != row.end(); ++it)
      if (std::find(cols.begin(), cols.end(), it.key()) == cols.end()) cols.push_back(it.key());

  // A column of numbers (missing or null cells allowed) reads best
  // right-aligned, so that digits of equal weight line up.
  std::vector<bool> numeric(cols.size(), true);
  std::vector<size_t> width(cols.size());
  std::vector<std::vector<std::string>> cells;
  for (size_t i = 0; i < cols.size(); i++) width[i] = display_width(cols[i]);
  for (auto& row : rows) {
    std::vector<std::string> r;
    for (size_t i = 0; i < cols.size(); i++) {
      auto it = row.find(cols[i]);
      if (it == row.end()) {
        r.emplace_back();
      } else {
        if (!it->is_number() && !it->is_null()) numeric[i] = false;
        r.push_back(scalar(*it));
      }
      width[i] = std::max(width[i], display_width(r.back()));
    }
    cells.push_back(std::move(r));
  }

  auto line = [&](const std::vector<std::string>& r) {
    std::string l = indent;
    for (size_t i = 0; i < r.size(); i++) {
      size_t gap = width[i] - display_width(r[i]);
      if (i > 0) pad(l, 2);
      if (numeric[i]) pad(l, gap);
      l += r[i];
      if (!numeric[i]) pad(l, gap);
    }
    while (l.size() > indent.size() && l.back() == ' ') l.pop_back();
    out += l + "\n";
  };
  line(cols);
  for (auto& r : cells) line(r);
}

void render(const json& v, const std::string& indent, std::string& out) {
  if (is_table(v)) {
    table(v, indent, out);
  } else if (v.is_structured() && v.empty()) {
    out += indent + "(none)\n";
  } else if (v.is_object()) {
    bool first = true, after_section = false;
    for (auto it = v.begin(); it != v.end(); ++it) {
      // A blank line around each section keeps several tables apart.
      if (!first && (it->is_structured() || after_section)) out += "\n";
      if (it->is_structured()) {
        out += indent + it.key() + ":\n";
        render(*it, indent + "  ", out);
      } else {
        out += indent + it.key() + ": " + scalar(*it) + "\n";
      }
      first = false;
      after_section = it->is_structured();
    }
  } else if (v.is_array()) {
    for (auto& e : v) render(e, indent, out);
  } else if (!v.is_null() || !indent.empty()) {
    out += indent + scalar(v) + "\n";
  }
}

}  // namespace

size_t display_width(const std::string& s) {
  // UTF-8 continuation bytes are 10xxxxxx; every other byte starts a character.
  return size_t(std::count_if(s.begin(), s.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xc0) != 0x80; }));
}

std::string render_human(const json& data) {
  std::string out;
  render(data, "", out);
  return out;
}

}  // namespace moat
